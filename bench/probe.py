"""Probe of the fused path's costs, in one device call (part ``probe`` of bench/gpu_check.sh).

For each shape (float32 C = 4096 at N*C = 2^28; C = 10 and 100 at N = 2^24, int32 and int64
labels; bf16 C = 32768), on one set of arrays:

    call        gpuce.softmax_cross_entropy(x, y, return_grad=True) as a user calls it (and with
                check_labels=False: no read-back, so its host time is the overhead alone)
    kernel      the fused kernels alone, relaunched with the call's arguments (no host work)
    host        the call's host time (cupyx.profiler.benchmark cpu_times)
    grid xK     the kernel alone with K times the one-wave grid (K = 0.5, 2, 4)
    stream      a read+write kernel with the same grid and block size (16-byte loads, one
                store each): what the launch shape can move, the ceiling
    copy        cupy.copyto of the logits
    floor       byte floor: logits read + gradient written + labels read, at the copy's rate

Writes probe.csv (tidy rows) under --out and prints a table last; host_profile.txt holds a
cProfile of 2000 calls (where the host time of a call goes).  There is no label gate
to remove in these kernels (rows are read whatever their label), so a "kernel
without the label gate" experiment has no counterpart here.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

STREAM = r"""
extern "C" __global__ void gpuce_probe_stream(const float4* __restrict__ x, float4* __restrict__ y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = x[i];
}
"""


def main(argv=None) -> int:
    import cupy as cp
    from cupyx.profiler import benchmark

    import gpuce
    from gpuce._cuda import fused
    from gpuce.benchmark import byte_floor, load_providers

    fused_kernel_only = load_providers("ce").fused_kernel_only

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    stream = cp.RawKernel(STREAM, "gpuce_probe_stream")
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    from gpuce._validation import bfloat16_dtype

    shapes = [("float32", 2**28 // 4096, 4096, "int64"), ("float32", 2**24, 10, "int32"),
              ("float32", 2**24, 10, "int64"), ("float32", 2**24, 100, "int32"),
              ("float32", 2**24, 100, "int64"), ("bfloat16", 2**28 // 32768, 32768, "int64")]
    rows = []

    def t50(fn):
        r = benchmark(fn, n_repeat=a.repeat, n_warmup=3)
        return float(np.median(r.gpu_times[0]) * 1e3), float(np.median(r.cpu_times) * 1e3)

    for dtype, n, c, idx in shapes:
        dt = bfloat16_dtype() if dtype == "bfloat16" else np.dtype(dtype)
        x = cp.random.standard_normal((n, c), dtype=cp.float32).astype(dt)
        y = cp.random.randint(0, c, n).astype(idx)
        dst = cp.empty_like(x)
        rec = {}
        rec["copy"] = t50(lambda: cp.copyto(dst, x))
        rec["call"] = t50(lambda: gpuce.softmax_cross_entropy(x, y, return_grad=True))
        # no read-back: the host column is then the Python and launch overhead alone (the
        # 30 µs target); with the read-back it includes waiting for the kernels
        rec["call, check_labels=False"] = t50(
            lambda: gpuce.softmax_cross_entropy(x, y, return_grad=True, check_labels=False))
        kernel = fused_kernel_only(cp, x, y)
        plan = kernel()
        rec["kernel"] = t50(kernel)
        dev = fused.current_device()
        wave = fused.grid_blocks(plan, n, dev, *fused.residency(plan))
        cl = max(1, plan.variant.cluster)
        for k in (0.5, 2, 4):
            g = max(cl, int(wave * k) // cl * cl)
            if g <= dev.sms * fused.MAX_BLOCKS_PER_SM:
                rec[f"grid x{k}"] = t50(fused_kernel_only(cp, x, y, grid=g))
        n16 = x.nbytes // 16
        xs, ds = x.view(cp.uint8)[: n16 * 16].view(cp.float32), dst.view(cp.uint8)[: n16 * 16].view(cp.float32)
        rec["stream"] = t50(lambda: stream((wave,), (plan.threads,), (xs, ds, np.int64(n16))))
        copy_bw = 2 * x.nbytes / (rec["copy"][0] / 1e3)
        floor = byte_floor(n, c, x.itemsize, y.itemsize) / copy_bw * 1e3
        for what, (g_ms, c_ms) in rec.items():
            rows.append(dict(gpu_name=gpu, dtype=dtype, N=n, C=c, labels=idx, what=what, p50_ms=f"{g_ms:.4f}",
                             cpu_ms=f"{c_ms:.4f}", floor_ms=f"{floor:.4f}", frac_of_floor=f"{floor / g_ms:.3f}",
                             plan=plan.describe(), grid=wave))
        print(f"{dtype} N={n} C={c} {idx} [{plan.describe()}, grid {wave}] floor {floor:.3f} ms: " + ", ".join(
            f"{k} {v[0]:.3f}" for k, v in rec.items()), flush=True)
        del x, y, dst
        cp.get_default_memory_pool().free_all_blocks()
    host_profile(cp, gpuce, a.out / "host_profile.txt")
    path = a.out / "probe.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("| shape | what | ms | host ms | of floor |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} {r['N']}x{r['C']} {r['labels']} | {r['what']} | {r['p50_ms']} | {r['cpu_ms']} | "
              f"{r['frac_of_floor']} |")
    return 0


def host_profile(cp, gpuce, path, calls=2000):
    """Where a call's host time goes: cProfile of ``calls`` calls (float32 4096 x 4096,
    check_labels=False, so nothing waits for the device), the 30 costliest functions by
    their own time, written to ``path``."""
    import cProfile
    import io
    import pstats

    x = cp.random.standard_normal((4096, 4096), dtype=cp.float32)
    y = cp.random.randint(0, 4096, 4096)
    for _ in range(20):
        gpuce.softmax_cross_entropy(x, y, return_grad=True, check_labels=False)
    cp.cuda.Device().synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        gpuce.softmax_cross_entropy(x, y, return_grad=True, check_labels=False)
        if _ % 100 == 99:  # keep the launch queue short: a full queue makes launches wait
            cp.cuda.Device().synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    path.write_text(out.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())
