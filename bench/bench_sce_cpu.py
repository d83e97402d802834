"""CPU backend: softmax_cross_entropy (loss + grad) against one read+write copy of the logits.

Goal (issue 2): <= 2.0x a copy for C >= 1000.  Medians of --repeat runs, same process,
same buffers.  Rows go to bench/results/cpu_sce.csv.

    python bench/bench_sce_cpu.py [--elements 2**23] [--repeat 7]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpuce  # noqa: E402
from bench._results import machine_name, upsert  # noqa: E402


def timeit(fn, repeat):
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return np.percentile(ts, [20, 50, 80])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--elements", type=lambda s: int(eval(s)), default=2**23)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000, 4096, 32768])
    p.add_argument("--dry", action="store_true", help="tiny sizes, no CSV (a smoke run)")
    a = p.parse_args(argv)
    if a.dry:
        a.elements, a.repeat = 2**14, 2
    rows, machine = [], machine_name()
    print(f"{'C':>7} {'N':>8} {'copy ms':>9} {'sce ms':>9} {'ratio':>6}  (loss+grad, fp32, {machine})")
    rng = np.random.default_rng(0)
    for c in a.classes:
        n = max(1, a.elements // c)
        x = rng.standard_normal((n, c)).astype(np.float32)
        y = rng.integers(0, c, n)
        dst = np.empty_like(x)
        copy = timeit(lambda: np.copyto(dst, x), a.repeat)
        sce = timeit(lambda: gpuce.softmax_cross_entropy(x, y, return_grad=True), a.repeat)
        ratio = sce[1] / copy[1]
        print(f"{c:>7} {n:>8} {copy[1]:9.2f} {sce[1]:9.2f} {ratio:6.2f}")
        gb = 8 * n * c / 1e9
        for prov, t in (("copy", copy), ("gpuce-numpy", sce)):
            rows.append(dict(op="softmax_cross_entropy" if prov != "copy" else "copy", provider=prov,
                             mode="full", dtype="float32", N=n, C=c, gpu_name=machine,
                             p20_ms=f"{t[0]:.4f}", p50_ms=f"{t[1]:.4f}", p80_ms=f"{t[2]:.4f}",
                             gbps=f"{gb / (t[1] / 1e3):.2f}", frac_of_copy=f"{copy[1] / t[1]:.3f}"))
    if not a.dry:
        print("wrote", upsert("cpu_sce.csv", rows))


if __name__ == "__main__":
    main()
