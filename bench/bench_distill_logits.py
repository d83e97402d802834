"""Logit distillation on materialised logits (the dense form): time and peak memory of a step.

One call of each provider (bench/providers_distill_logits.py) computes, from the student's
logits S (N, V) and the teacher's T (N, V), at a temperature τ and a β, the mean over the rows
of the forward KL (β = 0), TRL's generalised JSD (0 < β < 1) or the reverse KL (β = 1), and its
gradient with respect to S (mode ``fwd+bwd:beta=β``, as bench/bench_distill.py names it):

* ``gpuce``          gpuce.distillation_loss(..., return_grad=True)
* ``gpuce-torch``    gpuce.torch.distillation_loss (autograd)
* ``torch``          the eager reference (float32 log_softmax of both, the divergence; autograd)
* ``torch-compile``  the same under torch.compile (compiled in the warm-up, not timed)
* ``liger-jsd``, ``liger-kldiv``  Liger-Kernel's LigerJSD / LigerKLDIVLoss (β = 0), where they
                     import and compute the same quantity (checked at run time)

The byte floor of the step is two reads and one write of an N × V array: S and T read, the
student's gradient written, 3 N V itemsize bytes (``floor_mib``).  A device copy of S (one read
and one write, provider ``copy``, mode ``copy``) is timed at every shape and dtype as the
bandwidth yardstick: ``floor_ms`` is the floor's bytes over the copy's measured bandwidth,
``frac_of_floor`` = floor_ms / p50 (1 = at the floor), ``frac_of_copy`` = the copy's p50 / the
provider's p50, and ``gbps`` the floor's bytes over the p50 time (the achieved bandwidth, as if
the step moved only the floor's bytes).

    python bench/bench_distill_logits.py          # GPU (CuPy + torch on CUDA): N = 8192 rows,
                                                  # V = 32768, 65536, 131072, float32 and
                                                  # bfloat16, β = 0 and 0.5
                                                  # -> distill_logits_gpu.csv
    python bench/bench_distill_logits.py --dry    # CPU: NumPy + torch CPU, float32,
                                                  # N × V = 256 × 8192 and 1024 × 32768
                                                  # -> distill_logits_cpu.csv
    options: --shape N V, --dtypes, --betas, --providers, --repeat, --temperature (1.0),
             --csv PATH

Rows are upserted (gpuce.benchmark.upsert, the harness's columns, C = V; β in ``mode``) after
every point, so a run cut off by a time limit keeps what it measured; τ, β and the sizes are in
``note`` as ``key=value`` pairs.  Peak memory as in bench/bench_distill.py: on a GPU CuPy's
pool growth plus torch's peak, on the CPU the process's peak resident size over its size
before the call.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import numpy as np

from gpuce.benchmark import cpu_name, gpu_time, load_providers, optional_torch, peak_extra_mib, upsert

try:  # the modes and the CPU probes are the linear distillation benchmark's
    from bench.bench_distill import BETAS, RESULTS, mode_name
    from bench.bench_tokens import _free, cpu_peak_extra_mib, cpu_time, fix_malloc
except ImportError:  # run as a script without the repository root on the path
    from bench_distill import BETAS, RESULTS, mode_name
    from bench_tokens import _free, cpu_peak_extra_mib, cpu_time, fix_malloc

OP = "distill_logits"
CPU_CSV = RESULTS / "distill_logits_cpu.csv"
GPU_CSV = RESULTS / "distill_logits_gpu.csv"
# (N, V, dtype); the GPU list in the order it is run (a cut-off run keeps the first ones)
GPU_SHAPES = [(8192, v, dt) for dt in ("bfloat16", "float32") for v in (32768, 65536, 131072)]
CPU_SHAPES = [(256, 8192, "float32"), (1024, 32768, "float32")]


def floor_bytes(n, v, itemsize):
    """Bytes the step must move: the student's and the teacher's logits read, the student's
    gradient written."""
    return 3 * n * v * itemsize


def _inputs(xp, n, v, dtype, seed=0):
    """(S, T): standard normal student logits times 2, the teacher's the student's plus as much
    noise again (correlated models, a KL of order one)."""
    from gpuce._validation import bfloat16_dtype

    dt = bfloat16_dtype() if dtype == "bfloat16" else np.dtype(dtype)
    if xp is np:
        rng = np.random.default_rng(seed)
        S = rng.standard_normal((n, v), dtype=np.float32) * 2
        T = S + rng.standard_normal((n, v), dtype=np.float32) * 2
    else:
        rs = xp.random.RandomState(seed)
        S = rs.standard_normal((n, v), dtype=xp.float32) * 2
        T = S + rs.standard_normal((n, v), dtype=xp.float32) * 2
    return S.astype(dt), T.astype(dt)


def run(shapes, betas=BETAS, repeat=3, temperature=1.0, names=None, csv=None, cpu=False):
    """Measure every (shape, β) point; rows upserted into ``csv`` (None: not written) after
    each point.  ``cpu``: NumPy arrays and torch on the CPU; else CuPy and torch on CUDA."""
    mod = load_providers(OP)
    if cpu:
        xp = np
        machine = cpu_name()
        fix_malloc()
        try:
            import torch
        except ImportError:
            torch = None
    else:
        import cupy as xp

        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        machine = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        torch = optional_torch()
    rows = []
    for n, v, dtype in shapes:
        S, T = _inputs(xp, n, v, dtype)
        dst = xp.empty_like(S)
        copy_t = (cpu_time(lambda: np.copyto(dst, S), repeat) if cpu
                  else gpu_time(xp, lambda: xp.copyto(dst, S), repeat))
        del dst
        copy_row = _copy_row(n, v, dtype, machine, S.dtype.itemsize, copy_t)
        rows.append(copy_row)
        if csv is not None:
            upsert(csv, [copy_row])
        for beta in betas:
            point = _run_point(xp, torch, mod, machine, S, T, dtype, beta, repeat, temperature,
                               names, cpu, copy_t)
            rows += point
            if csv is not None:
                upsert(csv, point)
        del S, T
        gc.collect()
        _free(xp, torch, cpu)
    if csv is not None:
        print(f"rows upserted into {csv}")
    return rows


def _copy_row(n, v, dtype, machine, itemsize, t):
    moved = 2 * n * v * itemsize
    return dict(op=OP, provider="copy", mode="copy", dtype=dtype, N=n, C=v, gpu_name=machine,
                p20_ms=f"{t[0]:.4f}", p50_ms=f"{t[1]:.4f}", p80_ms=f"{t[2]:.4f}",
                gbps=f"{moved / (t[1] / 1e3) / 1e9:.4g}", frac_of_copy="1.000",
                note=f"copy of the student's logits, one read + one write, {moved / 2**20:.2f} MiB; "
                     f"gbps = its bytes over its p50")


def _run_point(xp, torch, mod, machine, S, T, dtype, beta, repeat, temperature, names, cpu, copy_t):
    n, v = S.shape
    floor = floor_bytes(n, v, S.dtype.itemsize)
    bandwidth = 2 * n * v * S.dtype.itemsize / (copy_t[1] / 1e3)  # bytes/s of the copy
    floor_ms = floor / bandwidth * 1e3
    logits_mib = n * v * S.dtype.itemsize / 2**20
    mode = mode_name(beta)
    provs = mod.providers(xp, torch, S=S, T=T, beta=beta, temperature=temperature)
    if names:
        provs = {k: f for k, f in provs.items() if k in names}
    res = {}
    for name, fn in provs.items():
        try:
            if cpu:
                t = cpu_time(fn, repeat)
                peak = cpu_peak_extra_mib(fn)
            else:
                peak = peak_extra_mib(xp, fn)
                t = gpu_time(xp, fn, repeat)
            res[name] = (t, peak, "")
        except Exception as e:  # noqa: BLE001  (a provider may not support a dtype, or run out of memory)
            res[name] = (None, None, f"failed: {type(e).__name__}: {str(e)[:100]}")
            print(f"{name} {dtype} {mode}: {res[name][2]}")
        _free(xp, torch, cpu)
    del provs
    _free(xp, torch, cpu)
    print(f"\nN={n} V={v} {dtype} {mode} tau={temperature:g} on {machine}: logits {logits_mib:.1f} MiB "
          f"an array, byte floor {floor / 2**20:.1f} MiB (3 N V), copy {bandwidth / 1e9:.1f} GB/s, "
          f"floor {floor_ms:.3f} ms")
    print("| provider | p50 ms | GB/s (floor bytes) | frac of floor | peak extra MiB | vs logits |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for name, (t, peak, fail) in res.items():
        note = (f"tau={temperature:g}; beta={beta:g}; logits_mib={logits_mib:.2f}; "
                f"floor_mib={floor / 2**20:.2f}; copy_gbps={bandwidth / 1e9:.4g}")
        row = dict(op=OP, provider=name, mode=mode, dtype=dtype, N=n, C=v, gpu_name=machine)
        if t is None:
            rows.append(dict(row, note=f"{note}; {fail}"))
            continue
        gbps = floor / (t[1] / 1e3) / 1e9
        row.update(p20_ms=f"{t[0]:.4f}", p50_ms=f"{t[1]:.4f}", p80_ms=f"{t[2]:.4f}",
                   gbps=f"{gbps:.4g}", frac_of_copy=f"{copy_t[1] / t[1]:.3f}",
                   floor_ms=f"{floor_ms:.4f}", frac_of_floor=f"{floor_ms / t[1]:.3f}")
        if peak is not None:
            row["peak_extra_mib"] = f"{peak:.1f}"
        rows.append(dict(row, note=note))
        mem = f"{peak:.1f} | {peak / logits_mib:.2f}" if peak is not None else "– | –"
        print(f"| {name} | {t[1]:.3f} | {gbps:.1f} | {floor_ms / t[1]:.3f} | {mem} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true",
                   help="the CPU run: NumPy + torch CPU at small shapes (no GPU needed)")
    p.add_argument("--shape", type=int, nargs=2, default=None, metavar=("N", "V"),
                   help="one shape instead of the default list")
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "float16", "bfloat16"],
                   help="with --shape: its dtypes (default float32 with --dry, else bfloat16 and "
                        "float32); without: keep only these of the default list")
    p.add_argument("--betas", type=float, nargs="+", default=list(BETAS),
                   help="0: forward KL; (0, 1): generalised JSD; 1: reverse KL")
    p.add_argument("--providers", nargs="+", default=None, choices=load_providers(OP).NAMES)
    p.add_argument("--repeat", type=int, default=None, help="timed calls a point (default: 5 CPU, 10 GPU)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--csv", type=Path, default=None,
                   help="where the rows go (default bench/results/distill_logits_cpu.csv with "
                        "--dry, distill_logits_gpu.csv without)")
    a = p.parse_args(argv)
    if not (a.temperature > 0 and np.isfinite(a.temperature)):
        p.error(f"--temperature must be a finite number > 0, got {a.temperature}")
    if not all(0 <= b <= 1 for b in a.betas):
        p.error(f"--betas must be in [0, 1], got {a.betas}")
    if a.shape:
        dts = a.dtypes or (["float32"] if a.dry else ["bfloat16", "float32"])
        shapes = [(*a.shape, dt) for dt in dts]
    else:
        shapes = [s for s in (CPU_SHAPES if a.dry else GPU_SHAPES) if not a.dtypes or s[2] in a.dtypes]
    if not a.dry:
        from gpuce._help import why_no_gpu

        missing = why_no_gpu()
        if missing is not None:
            p.error(f"no GPU to measure on: {missing}; --dry runs the CPU rows")
    csv = a.csv or (CPU_CSV if a.dry else GPU_CSV)
    run(shapes, a.betas, a.repeat or (5 if a.dry else 10), a.temperature, a.providers, csv, cpu=a.dry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
