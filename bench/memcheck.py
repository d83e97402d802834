"""Every fused kernel under compute-sanitizer (part ``memcheck`` of bench/gpu_check.sh).

Runs each plan the planner lists for a set of shapes (the tile, warp teams, block teams,
clusters, the register stage, twopass and twopass over clusters; labels and probability
targets; rows on and off their 16-byte boundary), then the fused token and distillation
kernels, on small batches, so that ``compute-sanitizer --tool memcheck`` (or racecheck) can
watch every access::

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/memcheck.py

**The edge granules.** A row that starts or ends inside a 16-byte granule is read as the
aligned granules that hold it (its edge values masked in sums and stores), so a kernel may read
up to 15 bytes before a row's first value or after its last.  Those bytes lie in the same
16-byte-aligned granule as a value of the array, so in the same page and never a fault; but
memcheck reports a read past the end of a tightly sized allocation.  By default every array
here is a view of a buffer with 16 spare bytes on each side (the masked run: any report is a
real out-of-bounds access), and CuPy's memory pool is off (each buffer its own cudaMalloc, so
that memcheck sees each one's bounds).  ``--tight`` allocates every array at its exact size
instead: the edge reads then show as "Invalid __global__ read of size 16", expected, for the
record.  (With the pool on, as users run, the pool's 512-byte rounding keeps them inside an
allocation.)

``--list`` prints the cases and the kernel kinds the planner gives them on an H100-like device
(no GPU needed).
"""

from __future__ import annotations

import argparse
import sys
import zlib

import numpy as np

# (logits dtype, C, target kind, shifted rows, N)
CASES = [
    ("float32", 10, "label", False, 300),
    ("float32", 100, "label", False, 300),
    ("bfloat16", 100, "prob", False, 130),
    ("float32", 1000, "label", False, 64),
    ("float32", 1001, "label", True, 64),
    ("float16", 4096, "prob", False, 32),
    ("float64", 777, "label", True, 32),
    ("bfloat16", 50257, "label", True, 12),
    ("float32", 131072, "label", False, 12),
    ("float32", 262144, "label", False, 8),
]
TOKEN_CASES = [("float32", 1000, False, 64), ("bfloat16", 50257, True, 12), ("float32", 131072, False, 8)]
DISTILL_CASES = [("float32", 1000, False, 64), ("bfloat16", 32768, True, 12), ("float16", 4099, True, 16)]


def _np_dtype(name):
    from gpuce._validation import bfloat16_dtype

    return bfloat16_dtype() if name == "bfloat16" else np.dtype(name)


def _array(cp, values, shifted: bool, tight: bool):
    """``values`` (N, C) on the device: tight, or a view with 16 spare bytes on each side of
    its buffer; shifted rows start one value into a row one value wider."""
    n, c = values.shape
    width = c + 1 if shifted else c
    if tight:
        buf = cp.empty((n, width), values.dtype)
        out = buf[:, 1:] if shifted else buf
    else:
        pad = 16 // values.itemsize
        flat = cp.empty(n * width + 2 * pad, values.dtype)
        buf = flat[pad:pad + n * width].reshape(n, width)
        out = buf[:, 1:] if shifted else buf
    out[...] = cp.asarray(values)
    return out


def _vector(cp, values, tight: bool):
    if tight:
        return cp.asarray(values)
    pad = max(1, 16 // values.itemsize)
    flat = cp.empty(values.size + 2 * pad, values.dtype)
    out = flat[pad:pad + values.size]
    out[...] = cp.asarray(values)
    return out


def _logits(rng, dtype, n, c):
    x = (rng.standard_normal((n, c)) * 3).astype(_np_dtype(dtype))
    x[0, 0] = -np.inf
    if n > 2:
        x[2, c // 2] = np.nan
    return x


def _probs(rng, dtype, n, c):
    t = rng.random((n, c))
    return (t / t.sum(1, keepdims=True)).astype(_np_dtype(dtype))


def _seed(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("-".join(map(str, parts)).encode()))


def run_ce(cp, tight: bool) -> int:
    from gpuce._cuda import fused as F
    from gpuce._cuda import sce
    from gpuce._validation import sce_args

    launched = 0
    for dtype, c, kind, shifted, n in CASES:
        rng = _seed("ce", dtype, c, kind, shifted)
        x = _array(cp, _logits(rng, dtype, n, c), shifted, tight)
        if kind == "prob":
            t = _array(cp, _probs(rng, dtype, n, c), shifted, tight)
        else:
            lbl = rng.integers(0, c, n)
            lbl[1] = -100
            t = _vector(cp, lbl.astype(np.int64), tight)
        g = _array(cp, np.zeros((n, c), _np_dtype(dtype)), shifted, tight)
        args = sce_args(x, t, reduction="mean", ignore_index=-100, weight=None, label_smoothing=0.0,
                        z_loss=1e-4, return_grad=True, inplace=False, return_stats=True)
        cands, _, _ = F.candidates_for(x, kind, "int32" if kind == "prob" else "int64",
                                       t if kind == "prob" else None, g)
        for p in cands:
            sce.softmax_cross_entropy(x, t, None, args, g, "fused", p.variant)
            cp.cuda.Device().synchronize()
            print(f"ce {dtype} C={c} {kind} shifted={shifted}: {p.describe()}", flush=True)
            launched += 1
    return launched


def run_rows(cp, tight: bool) -> int:
    import gpuce

    launched = 0
    for dtype, c, shifted, n in TOKEN_CASES:
        rng = _seed("tok", dtype, c, shifted)
        x = _array(cp, _logits(rng, dtype, n, c), shifted, tight)
        lbl = rng.integers(0, c, n)
        lbl[1] = -100
        y = _vector(cp, lbl.astype(np.int64), tight)
        gpuce.token_logprobs(x, y, return_entropy=True, return_grad=True,
                             grad_logprobs=_vector(cp, np.ones(n, np.float32), tight),
                             grad_entropy=_vector(cp, np.full(n, 0.5, np.float32), tight))
        cp.cuda.Device().synchronize()
        print(f"tokens {dtype} C={c} shifted={shifted}", flush=True)
        launched += 1
    for dtype, c, shifted, n in DISTILL_CASES:
        rng = _seed("dis", dtype, c, shifted)
        s = _array(cp, _logits(rng, dtype, n, c), shifted, tight)
        t = _array(cp, (rng.standard_normal((n, c)) * 3).astype(_np_dtype(dtype)), shifted, tight)
        for beta in (0.0, 1.0):
            gpuce.distillation_loss(s, t, beta=beta, return_grad=True)
            cp.cuda.Device().synchronize()
            print(f"distill {dtype} C={c} shifted={shifted} beta={beta}", flush=True)
            launched += 1
    return launched


def kind_name(v) -> str:
    """A variant's kernel kind, its cluster size and its register stage, e.g. cluster/CL8/regs."""
    return v.kind + (f"/CL{v.cluster}" if v.cluster > 1 else "") + ("/regs" if v.regs else "")


def list_cases() -> None:
    """The cases and the kernel kinds of their plans on an H100-like device (no GPU)."""
    from gpuce._cuda import fused as F

    dev = F.Device(arch=90, sms=132, smem_optin=227 * 1024)
    for dtype, c, kind, shifted, n in CASES:
        vec = F.VEC_MAX[dtype]  # every array at one offset: 16-byte packs, edge packs masked
        cands = F.candidates(dtype, kind, "int32" if kind == "prob" else "int64", c, vec, dev,
                             None if shifted else vec, shifted or c % vec != 0)
        kinds = sorted({kind_name(p.variant) for p in cands})
        print(f"ce {dtype} N={n} C={c} {kind} shifted={shifted}: {' '.join(kinds)}")
    for dtype, c, shifted, n in TOKEN_CASES:
        print(f"tokens {dtype} N={n} C={c} shifted={shifted}")
    for dtype, c, shifted, n in DISTILL_CASES:
        print(f"distill {dtype} N={n} C={c} shifted={shifted} beta 0, 1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tight", action="store_true",
                    help="exact-size arrays (the edge granules' reads show in memcheck: expected)")
    ap.add_argument("--pool", action="store_true", help="keep CuPy's memory pool on")
    ap.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    a = ap.parse_args(argv)
    if a.list:
        list_cases()
        return 0
    import cupy as cp

    if not a.pool:
        cp.cuda.set_allocator(None)  # every buffer its own cudaMalloc: memcheck sees its bounds
    n = run_ce(cp, a.tight) + run_rows(cp, a.tight)
    print(f"memcheck: {n} fused launches ({'tight' if a.tight else 'masked'} arrays, "
          f"pool {'on' if a.pool else 'off'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
