"""Token log-probabilities and entropy from hidden states (RL training): time and peak memory.

One call of each provider (bench/providers_tokens.py) computes, from X (N, D), a head W (V, D)
and tokens y at a temperature τ, each row's log p and entropy H (mode ``fwd``), or those and
the gradients of Σ log p + 0.1 Σ H with respect to X and W (mode ``fwd+bwd``):

* ``gemms``         the matrix products alone (X Wᵀ; with the backward also G W and Gᵀ X)
* ``gpuce``         gpuce.linear_token_logprobs (automatic chunks: never the N × V logits)
* ``gpuce-torch``   gpuce.torch.linear_token_logprobs, where gpuce.torch has it
* ``torch``         the materialised reference (x @ Wᵀ in the input dtype, float32 log_softmax,
                    gather, entropy; autograd)
* ``torch-compile`` the same under torch.compile (compiled in the warm-up, not timed)
* ``liger``         Liger-Kernel's fused linear cross-entropy, reduction="none", on x / τ: log p
                    only (it has no entropy), where importable

Each is set against the size of the logits it would materialise, N × V × 4 bytes
(``logits_mib``), and the byte floor of the call: X and W read (and dX, dW written with the
backward) plus tokens and per-row outputs (``floor_mib``); the memory floor is what the call
must return (``out_mib``: dX + dW + the rows).

    python bench/bench_tokens.py                  # GPU (CuPy + torch on CUDA): bf16 and fp32
                                                  # at V = 128256 and 151936 -> tokens_gpu.csv
    python bench/bench_tokens.py --dry            # CPU: NumPy + torch CPU, N = D = 256 at
                                                  # V = 8192, 32768, 131072, and N = 2048,
                                                  # D = 256, V = 32768 -> tokens_cpu.csv
    options: --shape N D V, --dtypes, --modes fwd+bwd fwd, --providers, --repeat,
             --temperature (0.7), --csv PATH, --png PATH

Rows are upserted (gpuce.benchmark.upsert, the harness's columns, C = V) after every point, so
a run cut off by a time limit keeps what it measured; D, τ and the sizes above are in
``note`` as ``key=value`` pairs; ``gbps`` is the byte floor over the p50 time.  Peak memory is
what a call adds on top of its inputs: on a GPU CuPy's pool growth plus torch's peak
(gpuce.benchmark.peak_extra_mib), on the CPU the process's peak resident size over its
resident size before the call (Linux: /proc/self/status after resetting the peak through
/proc/self/clear_refs; glibc's mmap threshold fixed at 128 KiB, so that large freed arrays
are returned to the system rather than reused from the heap).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np

from gpuce.benchmark import cpu_name, gpu_time, load_providers, optional_torch, peak_extra_mib, upsert

RESULTS = Path(__file__).resolve().parent / "results"
CPU_CSV = RESULTS / "tokens_cpu.csv"
GPU_CSV = RESULTS / "tokens_gpu.csv"
# (N, D, V, dtype); the GPU list in the order it is run (a cut-off run keeps the first ones)
GPU_SHAPES = [(n, 4096, v, "bfloat16") for n in (4096, 8192) for v in (128256, 151936)] + \
             [(4096, 4096, v, "float32") for v in (128256, 151936)]
CPU_SHAPES = [(256, 256, v, "float32") for v in (8192, 32768, 131072)] + [(2048, 256, 32768, "float32")]
MODES = ("fwd+bwd", "fwd")
ENTROPY_WEIGHT = 0.1


def sizes_mib(n, d, v, itemsize, mode):
    """The logits' size (N × V float32), the call's byte floor and the outputs it must hold
    (MiB): X and W read, dX and dW written with the backward; tokens (8 bytes) and the two
    float32 rows (log p, H)."""
    rows = 8 * n + 2 * 4 * n
    params = (n * d + v * d) * itemsize
    bwd = mode == "fwd+bwd"
    floor = params * (2 if bwd else 1) + rows
    out = (params if bwd else 0) + 2 * 4 * n
    return n * v * 4 / 2**20, floor / 2**20, out / 2**20


# ------------------------------------------------------------------------- CPU probes

def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def fix_malloc():
    """glibc: a fixed mmap threshold (128 KiB) and no dynamic raise, so large arrays come from
    mmap and go back on free (the peak probe then sees every call's own allocations)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except Exception:  # noqa: BLE001  (not glibc: the probe is rougher)
        pass


def cpu_peak_extra_mib(fn):
    """Peak resident memory one call of ``fn`` adds (MiB), or None where /proc cannot say."""
    gc.collect()
    try:
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
    except OSError:
        return None
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return max(0, peak - base) / 1024


def cpu_time(fn, repeat):
    """p20/p50/p80 ms of ``repeat`` calls after one warm-up call (torch.compile compiles there)."""
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return np.percentile(ts, [20, 50, 80])


# ------------------------------------------------------------------------------ the run

def _inputs(xp, n, d, v, dtype, seed=0):
    from gpuce._validation import bfloat16_dtype

    dt = bfloat16_dtype() if dtype == "bfloat16" else np.dtype(dtype)
    if xp is np:
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((n, d), dtype=np.float32).astype(dt)
        W = (rng.standard_normal((v, d), dtype=np.float32) * (1.0 / np.sqrt(d))).astype(dt)
        y = rng.integers(0, v, n).astype(np.int64)
    else:
        rs = xp.random.RandomState(seed)
        X = rs.standard_normal((n, d), dtype=xp.float32).astype(dt)
        W = (rs.standard_normal((v, d), dtype=xp.float32) * (1.0 / np.sqrt(d))).astype(dt)
        y = rs.randint(0, v, n).astype(xp.int64)
    return X, W, y


def run(shapes, modes=MODES, repeat=3, temperature=0.7, names=None, csv=None, cpu=False):
    """Measure every (shape, mode) point; rows upserted into ``csv`` (None: not written) after
    each point.  ``cpu``: NumPy arrays and torch on the CPU; else CuPy and torch on CUDA."""
    mod = load_providers("tokens")
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
    for n, d, v, dtype in shapes:
        X, W, y = _inputs(xp, n, d, v, dtype)
        for mode in modes:
            point = _run_point(xp, torch, mod, machine, X, W, y, dtype, mode, repeat, temperature, names, cpu)
            rows += point
            if csv is not None:
                upsert(csv, point)
        del X, W, y
        _free(xp, torch, cpu)
    if csv is not None:
        print(f"rows upserted into {csv}")
    return rows


def _free(xp, torch, cpu):
    gc.collect()
    if cpu:
        return
    xp.get_default_memory_pool().free_all_blocks()
    if torch is not None:
        torch.cuda.empty_cache()  # torch's cache would shrink the next point's free memory


def _run_point(xp, torch, mod, machine, X, W, y, dtype, mode, repeat, temperature, names, cpu):
    (n, d), v = X.shape, W.shape[0]
    logits, floor, out_mib = sizes_mib(n, d, v, X.dtype.itemsize, mode)
    provs = mod.providers(xp, torch, X=X, W=W, y=y, temperature=temperature,
                          backward=mode == "fwd+bwd")
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
    base = res.get("gemms", (None,))[0]
    print(f"\nN={n} D={d} V={v} {dtype} {mode} tau={temperature:g} on {machine}: logits {logits:.1f} MiB, "
          f"byte floor {floor:.1f} MiB, outputs {out_mib:.2f} MiB")
    print("| provider | p50 ms | vs gemms | peak extra MiB | vs logits |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for name, (t, peak, fail) in res.items():
        note = (f"D={d}; tau={temperature:g}; logits_mib={logits:.2f}; floor_mib={floor:.2f}; "
                f"out_mib={out_mib:.3f}")
        if name == "liger":
            note += "; log p only, no entropy"
        row = dict(op=mod.OP, provider=name, mode=mode, dtype=dtype, N=n, C=v, gpu_name=machine)
        if t is None:
            rows.append(dict(row, note=f"{note}; {fail}"))
            continue
        tr = t[1] / base[1] if base is not None else float("nan")
        row.update(p20_ms=f"{t[0]:.3f}", p50_ms=f"{t[1]:.3f}", p80_ms=f"{t[2]:.3f}",
                   gbps=f"{floor * 2**20 / (t[1] / 1e3) / 1e9:.4g}")
        if peak is not None:
            row["peak_extra_mib"] = f"{peak:.1f}"
        rows.append(dict(row, note=f"{note}; time_vs_gemms={tr:.3f}"))
        mem = f"{peak:.1f} | {peak / logits:.2f}" if peak is not None else "– | –"
        print(f"| {name} | {t[1]:.2f} | {tr:.2f} | {mem} |")
    return rows


def note_value(row, key):
    """A ``key=value`` of a row's note, as a float (None when absent)."""
    for part in row.get("note", "").split(";"):
        k, _, val = part.strip().partition("=")
        if k == key:
            try:
                return float(val)
            except ValueError:
                return None
    return None


def plot(rows, png: Path) -> int:
    """p50 time and peak extra memory against the logits' size, a column a mode, a line a
    (provider, dtype); the memory panels carry the logits' own size (dashed).  Returns the
    number of modes drawn (0 without matplotlib or timed rows)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib not installed")
        return 0
    ok = [r for r in rows if r.get("p50_ms")]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    if not modes:
        return 0
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
    for j, mode in enumerate(modes):
        sel = [r for r in ok if r["mode"] == mode]
        xs_all = sorted({note_value(r, "logits_mib") for r in sel})
        for prov, dtype in sorted({(r["provider"], r["dtype"]) for r in sel}):
            pts = sorted((note_value(r, "logits_mib"), float(r["p50_ms"]),
                          float(r["peak_extra_mib"]) if r.get("peak_extra_mib") else float("nan"))
                         for r in sel if (r["provider"], r["dtype"]) == (prov, dtype))
            for i, ax in ((1, axes[0, j]), (2, axes[1, j])):
                ax.plot([p[0] for p in pts], [p[i] for p in pts], marker="o", label=f"{prov} {dtype}")
        axes[1, j].plot(xs_all, xs_all, color="grey", lw=0.8, ls="--", label="logits (N·V·4 B)")
        for ax, what in ((axes[0, j], "p50 ms"), (axes[1, j], "peak extra MiB")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("logits N·V·4 bytes (MiB)")
            ax.set_ylabel(what)
            ax.set_title(f"{mode}: {what}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(f"token log p + entropy, linear form, {ok[0]['gpu_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"plot: {png}")
    return len(modes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true",
                   help="the CPU run: NumPy + torch CPU at small shapes (no GPU needed)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("N", "D", "V"),
                   help="one shape instead of the default list")
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "float16", "bfloat16"],
                   help="with --shape: its dtypes (default float32 with --dry, else bfloat16); "
                        "without: keep only these of the default list")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--providers", nargs="+", default=None, choices=load_providers("tokens").NAMES)
    p.add_argument("--repeat", type=int, default=None, help="timed calls a point (default: 5 CPU, 3 GPU)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--csv", type=Path, default=None,
                   help="where the rows go (default bench/results/tokens_cpu.csv with --dry, "
                        "tokens_gpu.csv without)")
    p.add_argument("--png", type=Path, default=None, help="also draw time and memory against the logits' size")
    a = p.parse_args(argv)
    if not (a.temperature > 0 and np.isfinite(a.temperature)):
        p.error(f"--temperature must be a finite number > 0, got {a.temperature}")
    if a.shape:
        shapes = [(*a.shape, dt) for dt in (a.dtypes or ["float32" if a.dry else "bfloat16"])]
    else:
        shapes = [s for s in (CPU_SHAPES if a.dry else GPU_SHAPES) if not a.dtypes or s[3] in a.dtypes]
    if not a.dry:
        from gpuce._help import why_no_gpu

        missing = why_no_gpu()
        if missing is not None:
            p.error(f"no GPU to measure on: {missing}; --dry runs the CPU rows")
    csv = a.csv or (CPU_CSV if a.dry else GPU_CSV)
    rows = run(shapes, a.modes, a.repeat or (5 if a.dry else 3), a.temperature, a.providers, csv, cpu=a.dry)
    if a.png is not None:
        plot(rows, a.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
