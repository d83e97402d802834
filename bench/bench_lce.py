"""Large-vocabulary linear cross-entropy: time and peak memory of loss + gradients.

One call of each provider computes the mean loss of ``F.cross_entropy(X Wᵀ, y)`` and the
gradients dX and dW, at Cut Cross-Entropy's published shape N=8192, D=2304, C=256000
(float32, float16 and bfloat16), on one GPU:

* ``gpuce``            gpuce.linear_cross_entropy, automatic chunk size
* ``gpuce[chunk=K]``   the same with chunk_size=K (the time/memory trade-off)
* ``three-gemms``      the three matrix products alone (X Wᵀ, G W, Gᵀ X): the time goal's basis
* ``torch``            F.linear + F.cross_entropy with materialised logits, autograd
* ``liger``            Liger-Kernel's LigerFusedLinearCrossEntropyLoss, where importable
* ``cce``              Cut Cross-Entropy's linear_cross_entropy (its default filter_eps="high"
                       skips small gradient blocks), where importable

Peak memory is what a call adds on top of its inputs (CuPy's pool growth plus torch's peak);
the lower bound is the dX and dW outputs.  Goals: gpuce's peak extra <= 1.1x the
lower bound, time <= 1.2x the three GEMMs.  Matrix products run without TF32 in every provider
that uses cuBLAS (CuPy's and torch's defaults); Triton-based providers choose their own.

    python bench/bench_lce.py [--dtypes float32 float16] [--repeat 5] [--chunks 1024] [--dry]

Rows are upserted into bench/results/lce.csv (columns of gpu_sce.csv; D, the lower bound and
the ratios in ``note``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import gpuce
from gpuce.benchmark import gpu_time, peak_extra_mib, upsert

CSV = Path(__file__).resolve().parent / "results" / "lce.csv"
SHAPE = (8192, 2304, 256000)  # N, D, C


def _torch_inputs(torch, X, W, y):
    tx = torch.from_dlpack(X).detach().clone().requires_grad_(True)
    tw = torch.from_dlpack(W).detach().clone().requires_grad_(True)
    return tx, tw, torch.from_dlpack(y)


def providers(cp, X, W, y, chunks):
    """name -> zero-argument callable returning its outputs (so the memory probe sees them)."""
    out = {}

    def three_gemms():
        f = X @ W.T
        return f @ W, f.T @ X

    out["three-gemms"] = three_gemms

    def gpuce_call(chunk):
        return lambda: gpuce.linear_cross_entropy(X, W, y, return_grad=True, check_finite=False,
                                                  chunk_size=chunk)

    out["gpuce"] = gpuce_call(None)
    for k in chunks:
        out[f"gpuce[chunk={k}]"] = gpuce_call(k)
    try:
        import torch
        import torch.nn.functional as F
    except Exception:
        return out
    tx, tw, ty = _torch_inputs(torch, X, W, y)

    def autograd(loss_fn):
        def run():
            tx.grad = tw.grad = None
            loss = loss_fn()
            loss.backward()
            return loss, tx.grad, tw.grad

        return run

    out["torch"] = autograd(lambda: F.cross_entropy(F.linear(tx, tw), ty))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = autograd(lambda: liger(tw, tx, ty))
    except Exception as e:  # noqa: BLE001
        print(f"liger: not importable ({type(e).__name__}: {e})")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cce"] = autograd(lambda: cce(tx, tw, ty))
    except Exception as e:  # noqa: BLE001
        print(f"cce: not importable ({type(e).__name__}: {e})")
    return out


def run(dtypes, repeat, chunks, shape, dry):
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    n, d, c = shape
    rows = []
    for dtype in dtypes:
        rs = cp.random.RandomState(0)
        X = rs.standard_normal((n, d), dtype=cp.float32).astype(dtype)
        W = (rs.standard_normal((c, d), dtype=cp.float32) * (1.0 / np.sqrt(d))).astype(dtype)
        y = rs.randint(0, c, n).astype(cp.int64)
        lower = (n * d + c * d) * np.dtype(dtype).itemsize / 2**20
        res = {}
        for name, fn in providers(cp, X, W, y, chunks).items():
            try:
                peak = peak_extra_mib(cp, fn)
                t = gpu_time(cp, fn, repeat)
            except Exception as e:  # noqa: BLE001  (a provider may not support a dtype)
                print(f"{name} {dtype}: failed ({type(e).__name__}: {str(e)[:120]})")
                rows.append(dict(op="linear_ce", provider=name, mode="fwd+bwd", dtype=dtype, N=n,
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
            rows.append(dict(op="linear_ce", provider=name, mode="fwd+bwd", dtype=dtype, N=n, C=c,
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
    if not dry:
        upsert(CSV, rows)
        print(f"rows upserted into {CSV}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"],
                   help="logits dtypes (bfloat16: ml_dtypes on the CuPy side)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--chunks", type=int, nargs="*", default=[1024], help="extra fixed chunk sizes")
    p.add_argument("--shape", type=int, nargs=3, default=SHAPE, metavar=("N", "D", "C"))
    p.add_argument("--dry", action="store_true", help="a small shape, no CSV")
    a = p.parse_args(argv)
    shape = (512, 128, 4096) if a.dry else tuple(a.shape)
    run(a.dtypes, a.repeat, a.chunks, shape, a.dry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
