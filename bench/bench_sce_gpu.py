"""GPU: portable softmax_cross_entropy (loss + grad) against a device copy, naive CuPy and torch.

Timed with cupyx.profiler.benchmark (CUDA events), p20/p50/p80 over --repeat runs, all
providers on the same data in one run.  GB/s counted at 8*N*C bytes (one fp32 read + one
write of the logits).  Rows go to bench/results/gpu_sce.csv keyed by the card's name.

    python bench/bench_sce_gpu.py [--elements 2**28] [--dry]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpuce  # noqa: E402
from bench._results import upsert  # noqa: E402


def naive_cupy(cp, x, y):
    m = x.max(1, keepdims=True)
    e = cp.exp(x - m)
    s = e.sum(1, keepdims=True)
    p = e / s
    loss = (cp.log(s[:, 0]) + m[:, 0] - x[cp.arange(x.shape[0]), y]).mean()
    p[cp.arange(x.shape[0]), y] -= 1
    p /= x.shape[0]
    return loss, p


def main(argv=None):
    import cupy as cp
    from cupyx.profiler import benchmark

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--elements", type=lambda s: int(eval(s)), default=2**28)
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000, 4096, 32768, 131072])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default=None, help="also write the CSV rows here")
    p.add_argument("--dry", action="store_true")
    a = p.parse_args(argv)
    if a.dry:
        a.elements, a.repeat, a.classes = 2**16, 3, [10, 1000]
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    try:
        import torch
    except Exception:
        torch = None
    rows = []
    print(f"{'C':>7} {'N':>9} {'provider':>14} {'p50 ms':>8} {'GB/s':>7} {'/copy':>6}   {gpu}")
    for c in a.classes:
        n = max(1, a.elements // c)
        x = cp.random.standard_normal((n, c), dtype=cp.float32)
        y = cp.random.randint(0, c, n).astype(cp.int64)
        dst = cp.empty_like(x)
        provs = {
            "copy": lambda: cp.copyto(dst, x),
            "gpuce-portable": lambda: gpuce.softmax_cross_entropy(x, y, return_grad=True),
            "naive-cupy": lambda: naive_cupy(cp, x, y),
        }
        if torch is not None and torch.cuda.is_available():
            tx = torch.from_dlpack(x).detach().clone().requires_grad_(True)
            ty = torch.from_dlpack(y)

            def torch_fb():
                tx.grad = None
                torch.nn.functional.cross_entropy(tx, ty).backward()

            provs["torch-eager"] = torch_fb
        res = {}
        for name, fn in provs.items():
            r = benchmark(fn, n_repeat=a.repeat, n_warmup=2)
            t = np.percentile(r.gpu_times[0] * 1e3, [20, 50, 80])
            res[name] = t
        for name, t in res.items():
            gbps = 8 * n * c / (t[1] / 1e3) / 1e9
            frac = res["copy"][1] / t[1]
            print(f"{c:>7} {n:>9} {name:>14} {t[1]:8.3f} {gbps:7.0f} {frac:6.2f}")
            rows.append(dict(op="copy" if name == "copy" else "softmax_cross_entropy", provider=name,
                             mode="full", dtype="float32", N=n, C=c, machine=gpu,
                             p20_ms=f"{t[0]:.4f}", p50_ms=f"{t[1]:.4f}", p80_ms=f"{t[2]:.4f}",
                             gbps=f"{gbps:.1f}", frac_of_copy=f"{frac:.3f}"))
        del x, y, dst
        cp.get_default_memory_pool().free_all_blocks()
    if not a.dry:
        print("wrote", upsert("gpu_sce.csv", rows))
        if a.out:
            import shutil

            shutil.copy(Path(__file__).resolve().parent / "results" / "gpu_sce.csv", a.out)


if __name__ == "__main__":
    main()
