"""Vocabulary-parallel cross-entropy on the CPU over gloo: a training step (forward and
backward) of gpuce.torch.cross_entropy(..., process_group=) against Megatron's scheme written
here as a torch reference (three all-reduces in the forward: the row maximum, the label's
logit, the sum of exponentials; the gradient softmax − one-hot locally), at world sizes 2
and 4.  Reports the median step time and the bytes each rank sends a row.

    PYTHONPATH=. python bench/bench_vocab_parallel.py --out bench/results/vocab_parallel_cpu.csv

Bytes a row (float32 logits): gpuce all-gathers its (N, 7) float64 partials, 56 bytes a row
from each rank; a ring all-gather sends (R − 1) × 56 bytes a row from each rank.  Megatron's
three all-reduces of one float32 a row each send 2 (R − 1) / R × 12 bytes a row from each rank
in a ring.  gpuce sends more bytes in one collective; Megatron fewer in three (three latencies).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import tempfile
import time
from datetime import date

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def megatron_step(local, target, c0, group):
    """Megatron-style vocab-parallel cross-entropy (mean over the rows), forward + backward by
    hand: three all-reduces in the forward, none in the backward."""
    m = local.max(dim=-1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shifted = local - m[:, None]
    inside = (target >= c0) & (target < c0 + local.shape[1])
    idx = torch.where(inside, target - c0, torch.zeros_like(target))
    picked = torch.where(inside, shifted.gather(1, idx[:, None])[:, 0], torch.zeros_like(m))
    dist.all_reduce(picked, op=dist.ReduceOp.SUM, group=group)
    e = shifted.exp()
    s = e.sum(dim=-1)
    dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
    loss = (s.log() - picked).mean()
    grad = e / s[:, None]
    grad[inside.nonzero()[:, 0], idx[inside]] -= 1.0
    grad /= local.shape[0]
    return loss, grad


def worker(rank, world, n, c, repeat, init, out):
    import gpuce.torch as gt

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=init)
    torch.set_num_threads(1)
    sizes = [c // world + (1 if r < c % world else 0) for r in range(world)]
    c0 = sum(sizes[:rank])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, c, generator=g) * 2
    target = torch.randint(0, c, (n,), generator=g)
    local = logits[:, c0:c0 + sizes[rank]].contiguous()
    group = dist.group.WORLD
    rows = []

    def gpuce_step():
        x = local.clone().requires_grad_(True)
        loss = gt.cross_entropy(x, target, process_group=group)
        loss.backward()
        return loss

    def megatron():
        return megatron_step(local, target, c0, group)[0]

    # the same loss (a check that the two compute the same thing)
    a, b = float(gpuce_step().detach()), float(megatron())
    for name, fn in (("gpuce", gpuce_step), ("megatron_reference", megatron)):
        fn()
        times = []
        for _ in range(repeat):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times)))
    if rank == 0:
        ring = 2 * (world - 1) / world
        sent = {"gpuce": (world - 1) * 56, "megatron_reference": ring * 12}
        coll = {"gpuce": 1, "megatron_reference": 3}
        with open(os.path.join(out, "rows.csv"), "w", newline="") as f:
            wr = csv.writer(f)
            for name, t in rows:
                wr.writerow([name, world, n, c, f"{t * 1e3:.3f}", coll[name],
                             f"{sent[name]:.1f}", f"{abs(a - b):.2e}"])
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--classes", type=int, default=32768)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", default="bench/results/vocab_parallel_cpu.csv")
    a = p.parse_args(argv)
    machine = f"{platform.machine()} {os.cpu_count()} cores (CPU, gloo)"
    header = ["date", "machine", "impl", "world", "rows", "classes", "step_ms_median",
              "collectives_forward", "bytes_sent_per_row_per_rank", "loss_abs_diff"]
    out_rows = []
    for world in a.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            init = "file://" + os.path.join(tmp, "store")
            mp.spawn(worker, args=(world, a.rows, a.classes, a.repeat, init, tmp), nprocs=world,
                     join=True)
            with open(os.path.join(tmp, "rows.csv")) as f:
                for r in csv.reader(f):
                    out_rows.append([date.today().isoformat(), machine] + r)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(header)
        wr.writerows(out_rows)
    for r in [header] + out_rows:
        print(",".join(map(str, r)))


if __name__ == "__main__":
    main()
