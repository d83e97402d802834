"""gpuce.torch on small CPU batches: where a forward + backward call's time goes.

At (N, C) = (64, 10) the arithmetic is nothing; a call is its fixed costs.  Rows (median µs of
one forward + backward, the same inputs, one run):

* ``torch``               F.cross_entropy, the target (gpuce.torch within 1.5x of it)
* ``gpuce.torch``         gpuce.torch.cross_entropy
* ``gpuce-numpy``         gpuce.softmax_cross_entropy(return_grad=True) on NumPy views of the
                          same tensors: the NumPy path with its checks, no torch machinery
* ``custom-op-11-args``   a torch.library.custom_op that only clones its input, with the
                          argument list of gpuce::cross_entropy (11 arguments) and an autograd
                          formula: what torch's custom-op dispatch costs gpuce.torch alone
* ``custom-op-3-args``    the same op with 3 arguments (options packed): how that cost grows
                          with the argument count

Rows go to bench/results/torch_small.csv.

    python bench/bench_torch_small.py [--repeat 3000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

import gpuce
import gpuce.torch as gt
from gpuce.benchmark import cpu_name, upsert

CSV = Path(__file__).resolve().parent / "results" / "torch_small.csv"


@torch.library.custom_op("gpuce_bench::clone11", mutates_args=())
def _clone11(x: Tensor, t: Tensor, w: Optional[Tensor], reduction: str, ignore_index: int,
             label_smoothing: float, z_loss: float, input_grad: bool, softcap: float = 0.0,
             return_stats: bool = False, check_labels: bool = True) -> tuple[Tensor, Tensor]:
    return x.clone(), x.clone()


_clone11.register_fake(lambda x, *a, **k: (x.new_empty(x.shape), x.new_empty(x.shape)))
_clone11.register_autograd(lambda ctx, g, _: (g,) + (None,) * 10,
                           setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op("gpuce_bench::clone3", mutates_args=())
def _clone3(x: Tensor, t: Tensor, options: str) -> tuple[Tensor, Tensor]:
    return x.clone(), x.clone()


_clone3.register_fake(lambda x, *a, **k: (x.new_empty(x.shape), x.new_empty(x.shape)))
_clone3.register_autograd(lambda ctx, g, _: (g, None, None),
                          setup_context=lambda ctx, inputs, output: None)


def median_us(step, repeat):
    for _ in range(20):
        step()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3000)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--c", type=int, default=10)
    p.add_argument("--no-csv", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(a.n, a.c, generator=g)
    y = torch.randint(0, a.c, (a.n,), generator=g)
    xn, yn = x0.numpy(), y.numpy()

    def autograd_step(fn):
        def step():
            x = x0.detach().requires_grad_(True)
            out = fn(x)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
        return step

    cases = {
        "torch": autograd_step(lambda x: torch.nn.functional.cross_entropy(x, y)),
        "gpuce.torch": autograd_step(lambda x: gt.cross_entropy(x, y)),
        "gpuce-numpy": lambda: gpuce.softmax_cross_entropy(xn, yn, return_grad=True),
        "custom-op-11-args": autograd_step(
            lambda x: _clone11(x, y, None, "mean", -100, 0.0, 0.0, True, 0.0, False, True)),
        "custom-op-3-args": autograd_step(lambda x: _clone3(x, y, "mean")),
    }
    res = {name: median_us(step, a.repeat) for name, step in cases.items()}
    machine = cpu_name()
    rows = []
    for name, us in res.items():
        ratio = us / res["torch"]
        print(f"{name:20s} {us:8.1f} µs  {ratio:5.2f}x torch")
        rows.append(dict(op="cross_entropy_fwd_bwd", provider=name, mode="full", dtype="float32",
                         N=a.n, C=a.c, gpu_name=machine, p50_ms=f"{us / 1e3:.4f}",
                         note=f"ratio_to_torch={ratio:.2f}; torch {torch.__version__}; 1 thread"))
    if not a.no_csv:
        print("wrote", upsert(CSV, rows))


if __name__ == "__main__":
    main()
