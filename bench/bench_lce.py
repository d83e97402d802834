"""Large-vocabulary linear cross-entropy: time and peak memory of loss + gradients.

One call of each provider computes the mean loss of ``F.cross_entropy(X Wᵀ, y)`` and the
gradients dX and dW, on one GPU, at the target shapes (float32, float16 and bfloat16):

* ``cce``      Cut Cross-Entropy's published shape, N = 8192, D = 2304, C = 256000
* ``llm``      a current LLM head, N = 16384 tokens, D = 4096, C = 128256
* ``trainer``  the classifier trainer's shape of bench_linear.py, N = 2^20, D = 512, C = 100
* ``wide``     bench_linear.py's other shape, N = 65536, D = 4096, C = 1000

Providers (bench/providers_lce.py):

* ``gpuce``            gpuce.linear_cross_entropy, automatic chunk size
* ``gpuce[chunk=K]``   the same with chunk_size=K (the time/memory trade-off; --chunks)
* ``three-gemms``      the three matrix products alone (X Wᵀ, G W, Gᵀ X): the time goal's basis
* ``torch``            F.linear + F.cross_entropy with materialised logits, autograd
* ``liger``            Liger-Kernel's LigerFusedLinearCrossEntropyLoss, where importable
* ``cce``              Cut Cross-Entropy's linear_cross_entropy (its default filter_eps="high"
                       skips small gradient blocks), where importable

Peak memory is what a call adds on top of its inputs (CuPy's pool growth plus torch's peak);
the lower bound is the dX and dW outputs.  Goals: gpuce's peak extra <= 1.1x the
lower bound, time <= 1.15x the three GEMMs (the trainer shape: <= 1.3x), faster than Liger and
CCE.  Matrix products run without TF32 in every provider that uses cuBLAS (CuPy's and torch's
defaults); Triton-based providers choose their own.

    python bench/bench_lce.py [--shapes cce llm trainer wide] [--dtypes float32 float16 bfloat16]
                              [--repeat 3] [--chunks 256 1024 4096] [--png bench/results/lce.png] [--dry]

Rows are upserted into bench/results/lce.csv (columns of gpu_sce.csv; D, the lower bound and
the ratios in ``note``); the plot (time against peak extra memory, one panel a shape and
dtype, one point a provider) is written next to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gpuce.benchmark import gpu_time, load_providers, optional_torch, peak_extra_mib, upsert

CSV = Path(__file__).resolve().parent / "results" / "lce.csv"
SHAPES = {  # name -> (N, D, C)
    "cce": (8192, 2304, 256000),
    "llm": (16384, 4096, 128256),
    "trainer": (2**20, 512, 100),
    "wide": (65536, 4096, 1000),
}


def run(dtypes, repeat, chunks, shapes, dry):
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    rows = []
    for shape in shapes:
        rows += _run_shape(cp, gpu, dtypes, repeat, [k for k in chunks if k < shape[0]], shape)
    if not dry:
        upsert(CSV, rows)
        print(f"rows upserted into {CSV}")
    return rows


def _run_shape(cp, gpu, dtypes, repeat, chunks, shape):
    n, d, c = shape
    lce = load_providers("lce")
    rows = []
    for dtype in dtypes:
        rs = cp.random.RandomState(0)
        X = rs.standard_normal((n, d), dtype=cp.float32).astype(dtype)
        W = (rs.standard_normal((c, d), dtype=cp.float32) * (1.0 / np.sqrt(d))).astype(dtype)
        y = rs.randint(0, c, n).astype(cp.int64)
        lower = (n * d + c * d) * np.dtype(dtype).itemsize / 2**20
        res = {}
        for name, fn in lce.providers(cp, optional_torch(), X=X, W=W, y=y, chunks=chunks).items():
            try:
                peak = peak_extra_mib(cp, fn)
                t = gpu_time(cp, fn, repeat)
            except Exception as e:  # noqa: BLE001  (a provider may not support a dtype)
                print(f"{name} {dtype}: failed ({type(e).__name__}: {str(e)[:120]})")
                rows.append(dict(op=lce.OP, provider=name, mode="fwd+bwd", dtype=dtype, N=n,
                                 C=c, gpu_name=gpu, note=f"D={d}; failed: {type(e).__name__}"))
                continue
            res[name] = (t, peak)
            cp.get_default_memory_pool().free_all_blocks()
        base = res.get("three-gemms", (None,))[0]
        print(f"\nN={n} D={d} C={c} {dtype} on {gpu}; lower bound (dX + dW) {lower:.0f} MiB")
        print("| provider | p50 ms | vs 3 GEMMs | peak extra MiB | vs lower bound |")
        print("|---|---|---|---|---|")
        for name, (t, peak) in res.items():
            tr = t[1] / base[1] if base is not None else float("nan")
            mr = peak / lower
            print(f"| {name} | {t[1]:.2f} | {tr:.2f} | {peak:.0f} | {mr:.2f} |")
            rows.append(dict(op=lce.OP, provider=name, mode="fwd+bwd", dtype=dtype, N=n, C=c,
                             gpu_name=gpu, p20_ms=f"{t[0]:.3f}", p50_ms=f"{t[1]:.3f}",
                             p80_ms=f"{t[2]:.3f}", peak_extra_mib=f"{peak:.1f}",
                             note=f"D={d}; lower_bound_mib={lower:.1f}; mem_ratio={mr:.3f}; "
                                  f"time_ratio_to_3gemms={tr:.3f}"))
        del X, W, y
        cp.get_default_memory_pool().free_all_blocks()
        try:
            import torch

            torch.cuda.empty_cache()  # torch's cache would shrink the next dtype's free memory
        except Exception:  # noqa: BLE001
            pass
    return rows


def plot(rows, png: Path) -> int:
    """Time against peak extra memory, one panel a (shape, dtype), one point a provider;
    returns the number of panels drawn (0 without matplotlib or timed rows)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib not installed")
        return 0
    ok = [r for r in rows if r.get("p50_ms")]
    panels = sorted({(r["N"], r["note"].split(";")[0], r["C"], r["dtype"]) for r in ok},
                    key=lambda k: (k[0], k[2], k[3]))
    if not panels:
        return 0
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4 * nrows), squeeze=False)
    for ax, (n, dnote, c, dtype) in zip(axes.ravel(), panels):
        pts = [r for r in ok if (r["N"], r["note"].split(";")[0], r["C"], r["dtype"]) == (n, dnote, c, dtype)]
        for r in pts:
            x, y = float(r["p50_ms"]), float(r["peak_extra_mib"])
            ax.scatter([x], [y], marker="o" if r["provider"].startswith("gpuce") else "s")
            ax.annotate(r["provider"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        lower = float(pts[0]["note"].split("lower_bound_mib=")[1].split(";")[0])
        ax.axhline(lower, color="grey", lw=0.8, ls="--")
        ax.set_title(f"N={n} {dnote} C={c} {dtype}", fontsize=9)
        ax.set_xlabel("p50 ms (loss + dX + dW)")
        ax.set_ylabel("peak extra MiB (dashed: dX + dW)")
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"linear cross-entropy: time against memory, {ok[0]['gpu_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"plot: {png}")
    return len(panels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"],
                   help="logits dtypes (bfloat16: ml_dtypes on the CuPy side)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--chunks", type=int, nargs="*", default=[256, 1024, 4096],
                   help="fixed chunk sizes timed beside the automatic one (those below N)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("N", "D", "C"), help="one other shape")
    p.add_argument("--png", type=Path, default=CSV.with_suffix(".png"))
    p.add_argument("--dry", action="store_true", help="a small shape, no CSV")
    a = p.parse_args(argv)
    if a.dry:
        shapes = [(512, 128, 4096)]
    else:
        shapes = [tuple(a.shape)] if a.shape else [SHAPES[k] for k in a.shapes]
    rows = run(a.dtypes, a.repeat, a.chunks, shapes, a.dry)
    plot(rows, a.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
