"""Logit distillation from hidden states (the LM-head form): time and peak memory of a step.

One call of each provider (bench/providers_distill.py) computes, from the student's Xs (N, D)
and head Ws (V, D) and the teacher's Xt (N, D) and Wt (V, D), at a temperature τ and a β, the
mean over the rows of the forward KL (β = 0) or the generalised JSD (0 < β < 1, TRL's
definition) and its gradients with respect to Xs and Ws (mode ``fwd+bwd:beta=β``):

* ``gemms``         the matrix products alone (both models' logits, then G Ws and Gᵀ Xs)
* ``gpuce``         gpuce.linear_distillation_loss (automatic chunks: never the N × V logits)
* ``gpuce-torch``   gpuce.torch.linear_distillation_loss, where gpuce.torch has it
* ``torch``         the materialised reference (both models' logits in the input dtype,
                    float32 log_softmax, the divergence; autograd)
* ``torch-compile`` the same under torch.compile (compiled in the warm-up, not timed)
* ``liger``         Liger-Kernel's LigerFusedLinearJSD, where importable and the β accepted

Each is set against the size of one model's logits, N × V × 4 bytes (``logits_mib``; the
materialised reference holds both models'), and the byte floor of the products' operands:
Xs, Ws, Xt and Wt read, dXs and dWs written (``floor_mib``); the memory floor is what the call
must return (``out_mib``: dXs + dWs).

    python bench/bench_distill.py                 # GPU (CuPy + torch on CUDA): bf16, N = 8192,
                                                  # D = 4096, V = 128256 and 151936, β = 0
                                                  # and 0.5 -> distill_gpu.csv
    python bench/bench_distill.py --dry           # CPU: NumPy + torch CPU, N = D = 256 at
                                                  # V = 8192, 32768, 131072, and N = 2048,
                                                  # D = 256, V = 32768 -> distill_cpu.csv
    options: --shape N D V, --dtypes, --betas, --providers, --repeat, --temperature (1.0),
             --csv PATH, --png PATH

The teacher has the student's width D here (the providers take any D_t).  Rows are upserted
(gpuce.benchmark.upsert, the harness's columns, C = V; β in ``mode``, since the harness's key
has no column of its own for it) after every point, so a run cut off by a time limit keeps
what it measured; D, τ, β and the sizes above are in ``note`` as ``key=value`` pairs; ``gbps``
is the byte floor over the p50 time.  Peak memory as in bench/bench_tokens.py: on a GPU CuPy's
pool growth plus torch's peak, on the CPU the process's peak resident size over its size
before the call.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gpuce.benchmark import cpu_name, gpu_time, load_providers, optional_torch, peak_extra_mib, upsert

try:  # the CPU probes and the note parser are the token benchmark's
    from bench.bench_tokens import _free, cpu_peak_extra_mib, cpu_time, fix_malloc, note_value
except ImportError:  # run as a script without the repository root on the path
    from bench_tokens import _free, cpu_peak_extra_mib, cpu_time, fix_malloc, note_value

RESULTS = Path(__file__).resolve().parent / "results"
CPU_CSV = RESULTS / "distill_cpu.csv"
GPU_CSV = RESULTS / "distill_gpu.csv"
# (N, D, V, dtype); the GPU list in the order it is run (a cut-off run keeps the first ones)
GPU_SHAPES = [(8192, 4096, v, "bfloat16") for v in (128256, 151936)]
CPU_SHAPES = [(256, 256, v, "float32") for v in (8192, 32768, 131072)] + [(2048, 256, 32768, "float32")]
BETAS = (0.0, 0.5)


def mode_name(beta):
    return f"fwd+bwd:beta={beta:g}"


def sizes_mib(n, d, v, itemsize, d_teacher=None):
    """One model's logits (N × V float32), the products' operand floor and the outputs the call
    must hold (MiB): Xs, Ws, Xt, Wt read, dXs and dWs written; the outputs dXs + dWs (the loss
    is a scalar)."""
    dt = d if d_teacher is None else d_teacher
    student = (n * d + v * d) * itemsize
    teacher = (n * dt + v * dt) * itemsize
    floor = 2 * student + teacher
    return n * v * 4 / 2**20, floor / 2**20, student / 2**20


def _inputs(xp, n, d, v, dtype, seed=0):
    """(Xs, Ws, Xt, Wt): standard normal hidden states, heads of scale 1/√D; the teacher's head
    is the student's plus as much noise again (correlated models, a KL of order one)."""
    from gpuce._validation import bfloat16_dtype

    dt = bfloat16_dtype() if dtype == "bfloat16" else np.dtype(dtype)
    s = 1.0 / np.sqrt(d)
    if xp is np:
        rng = np.random.default_rng(seed)
        Xs = rng.standard_normal((n, d), dtype=np.float32)
        Ws = rng.standard_normal((v, d), dtype=np.float32) * s
        Xt = Xs + rng.standard_normal((n, d), dtype=np.float32)
        Wt = Ws + rng.standard_normal((v, d), dtype=np.float32) * s
    else:
        rs = xp.random.RandomState(seed)
        Xs = rs.standard_normal((n, d), dtype=xp.float32)
        Ws = rs.standard_normal((v, d), dtype=xp.float32) * s
        Xt = Xs + rs.standard_normal((n, d), dtype=xp.float32)
        Wt = Ws + rs.standard_normal((v, d), dtype=xp.float32) * s
    return tuple(a.astype(dt) for a in (Xs, Ws, Xt, Wt))


def run(shapes, betas=BETAS, repeat=3, temperature=1.0, names=None, csv=None, cpu=False):
    """Measure every (shape, β) point; rows upserted into ``csv`` (None: not written) after
    each point.  ``cpu``: NumPy arrays and torch on the CPU; else CuPy and torch on CUDA."""
    import gc

    mod = load_providers("distill")
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
        arrays = _inputs(xp, n, d, v, dtype)
        for beta in betas:
            point = _run_point(xp, torch, mod, machine, arrays, dtype, beta, repeat, temperature,
                               names, cpu)
            rows += point
            if csv is not None:
                upsert(csv, point)
        del arrays
        gc.collect()
        _free(xp, torch, cpu)
    if csv is not None:
        print(f"rows upserted into {csv}")
    return rows


def _run_point(xp, torch, mod, machine, arrays, dtype, beta, repeat, temperature, names, cpu):
    Xs, Ws, Xt, Wt = arrays
    (n, d), v = Xs.shape, Ws.shape[0]
    logits, floor, out_mib = sizes_mib(n, d, v, Xs.dtype.itemsize, Xt.shape[1])
    mode = mode_name(beta)
    provs = mod.providers(xp, torch, Xs=Xs, Ws=Ws, Xt=Xt, Wt=Wt, beta=beta, temperature=temperature)
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
    print(f"\nN={n} D={d} V={v} {dtype} {mode} tau={temperature:g} on {machine}: logits {logits:.1f} MiB "
          f"a model, operand floor {floor:.1f} MiB, outputs {out_mib:.2f} MiB")
    print("| provider | p50 ms | vs gemms | peak extra MiB | vs logits |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for name, (t, peak, fail) in res.items():
        note = (f"D={d}; D_t={Xt.shape[1]}; tau={temperature:g}; beta={beta:g}; logits_mib={logits:.2f}; "
                f"floor_mib={floor:.2f}; out_mib={out_mib:.3f}")
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


def plot(rows, png: Path) -> int:
    """p50 time and peak extra memory against one model's logits' size, a column a β, a line a
    (provider, dtype); the memory panels carry the logits' own size (dashed).  Returns the
    number of columns drawn (0 without matplotlib or timed rows)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib not installed")
        return 0
    ok = [r for r in rows if r.get("p50_ms")]
    modes = sorted({r["mode"] for r in ok})
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
        axes[1, j].plot(xs_all, xs_all, color="grey", lw=0.8, ls="--", label="one model's logits (N·V·4 B)")
        for ax, what in ((axes[0, j], "p50 ms"), (axes[1, j], "peak extra MiB")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("one model's logits N·V·4 bytes (MiB)")
            ax.set_ylabel(what)
            ax.set_title(f"{mode}: {what}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(f"linear distillation step, {ok[0]['gpu_name']}", fontsize=10)
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
    p.add_argument("--betas", type=float, nargs="+", default=list(BETAS),
                   help="0: forward KL; (0, 1): generalised JSD; 1: reverse KL")
    p.add_argument("--providers", nargs="+", default=None, choices=load_providers("distill").NAMES)
    p.add_argument("--repeat", type=int, default=None, help="timed calls a point (default: 5 CPU, 3 GPU)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--csv", type=Path, default=None,
                   help="where the rows go (default bench/results/distill_cpu.csv with --dry, "
                        "distill_gpu.csv without)")
    p.add_argument("--png", type=Path, default=None, help="also draw time and memory against the logits' size")
    a = p.parse_args(argv)
    if not (a.temperature > 0 and np.isfinite(a.temperature)):
        p.error(f"--temperature must be a finite number > 0, got {a.temperature}")
    if not all(0 <= b <= 1 for b in a.betas):
        p.error(f"--betas must be in [0, 1], got {a.betas}")
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
    rows = run(shapes, a.betas, a.repeat or (5 if a.dry else 3), a.temperature, a.providers, csv, cpu=a.dry)
    if a.png is not None:
        plot(rows, a.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
