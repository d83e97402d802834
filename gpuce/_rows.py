"""The row work whose code differs by backend, each decision written once: the label range
check, the "mean" reduction's denominator, the L2 penalty's sum of squares, the softmax cross-
entropy rows (NumPy or CuPy backend), the block walk's block size, the bias gradient's column
sums and the row-wise softmax / log_softmax / logsumexp.  Used by the block walk (gpuce.sce),
the chunked linear model (gpuce.linear), the row-wise functions (gpuce.softmax), explain
(gpuce._explain) and the dask blocks (gpuce._dask); the modules above call these and do not
branch on the backend themselves."""

from __future__ import annotations

import numpy as np

from ._blocks import row_blocks
from ._impl import auto_impl, resolve_impl
from ._validation import acc_dtype

# Logits without an (N, C) view are walked in blocks of about this many elements (one block
# at most is copied): chunk-sized on the CPU, large enough on the GPU to keep launches full.
WALK_BLOCK_ELEMENTS_NUMPY = 1 << 20
WALK_BLOCK_ELEMENTS_CUPY = 1 << 24
# The NumPy path of softmax / log_softmax / logsumexp walks the rows in blocks of about this
# many elements (at least one row).
NUMPY_BLOCK_ELEMENTS = 1 << 18


def check_labels(xp, y, args):
    """Raise for the first label outside [0, C) other than ignore_index (one sync on CuPy)."""
    if xp is np:
        from ._sce_numpy import check_labels as check

        return check(y.astype(np.int64, copy=False), args)
    from ._cuda.sce import check_labels as check

    return check(xp, y, args)


def mean_denominator(xp, y, weight, args) -> float:
    """The "mean" reduction's denominator over the rows of ``y`` (all rows, or one dask
    block's), as softmax_cross_entropy: the weight sum of the non-ignored labels, or the row
    count for probability targets.  One sync on CuPy."""
    if args.kind != "label":
        return float(np.prod(y.shape[:-1], dtype=np.int64))
    y = y.ravel()
    if y.dtype.kind == "u":  # compared with a negative ignore_index as int64 (checked to fit)
        y = y.astype(np.int64)
    # rows with a label outside [0, C) (check_labels=False: NaN rows) count as ignored here
    active = (y != args.ignore_index) & (y >= 0) & (y < args.c)
    if weight is None:
        row_weight = active.astype(args.acc)
    else:
        row_weight = xp.where(active, weight[xp.where(active, y, 0)], 0).astype(args.acc)
    return float(row_weight.sum(dtype=np.float64))


def weighted_z_loss(z_loss, denominator, count) -> float:
    """The z-loss coefficient for a "mean" call with class weights: the loss is
    Σ_i L_i / D with D the weight sum of the non-ignored labels, but the z-loss part is
    z·Σ_i lse_i² / n over the n non-ignored rows, unweighted (as Liger-Kernel defines it):
    z·D/n divided by D is that (0 when n or D is 0: the zero-denominator rule)."""
    if not z_loss or not count or not denominator:
        return 0.0 if z_loss and not count else float(z_loss)
    return float(z_loss) * float(denominator) / float(count)


def mean_args(xp, y, weight, args, denominator=None, count=None):
    """``args`` for a "mean" call over the rows of ``y`` with the whole call's denominator set
    (``SceArgs.denominator``; ``denominator`` when the caller has it) and, with class weights
    and z-loss, the z-loss coefficient of :func:`weighted_z_loss` (from ``count``, the
    non-ignored rows, when given).  One sync on CuPy, two with class weights and z-loss."""
    from dataclasses import replace

    if args.reduction != "mean":
        return args
    if denominator is None:
        denominator = mean_denominator(xp, y, weight, args)
    z = args.z_loss
    if z and weight is not None and args.kind == "label":
        if count is None:
            count = mean_denominator(xp, y, None, args)
        z = weighted_z_loss(z, denominator, count)
    return replace(args, denominator=float(denominator), z_loss=z)


def sum_squares(xp, W):
    """Σ W² of a 2-D W in the accumulation dtype.  On the GPU a ReductionKernel over each
    row, then CuPy's sum of the C partials: a ReductionKernel over all elements (axis=None)
    runs on a single block in CuPy, far too few for a large W."""
    acc = acc_dtype(W.dtype)
    if xp is np:
        w = W.astype(acc, copy=False).ravel()
        return acc.type(np.dot(w, w))
    from ._cuda.kernels import get_kernel

    rows = xp.empty(W.shape[0], acc)
    get_kernel("gpuce_sumsq", T=W.dtype.name, A=acc.name)(W, rows, axis=1)
    return rows.sum(dtype=acc)


def walk_block_elements(xp) -> int:
    """About how many logits elements one block of the block walk (gpuce.sce.walk_blocks)
    holds on this backend (WALK_BLOCK_ELEMENTS_NUMPY or WALK_BLOCK_ELEMENTS_CUPY)."""
    return WALK_BLOCK_ELEMENTS_NUMPY if xp is np else WALK_BLOCK_ELEMENTS_CUPY


def predicted_tokens(xp, x2, args):
    """The predicted class of each row of (N, C) logits: the index of the row's maximum of the
    (capped) logits, ties to the lowest index, -1 for a row holding a NaN; (N,) int64.  Read in
    row blocks in the accumulation dtype (NumPy: about NUMPY_BLOCK_ELEMENTS, CuPy: about
    WALK_BLOCK_ELEMENTS_CUPY elements), before the backend may overwrite the logits with the
    gradient: one more read of the logits, with return_stats only."""
    n, c = x2.shape
    out = xp.empty(n, np.int64)
    if c == 0:
        out[...] = -1
        return out
    step = max(1, (NUMPY_BLOCK_ELEMENTS if xp is np else WALK_BLOCK_ELEMENTS_CUPY) // c)
    for r0 in range(0, n, step):
        block = x2[r0:r0 + step].astype(args.acc, copy=False)
        if args.softcap:
            block = xp.tanh(block / args.acc.type(args.softcap)) * args.acc.type(args.softcap)
        nan = xp.isnan(block).any(axis=1)
        out[r0:r0 + step] = xp.where(nan, -1, xp.argmax(block, axis=1))
    return out


def run_rows(xp, x2, target, weight, args, grad_out, impl="auto", variant=None):
    """The backend's work on validated (N, C) logits: a :class:`gpuce._results.SceRows`
    ``(rows, total, stats)``, the gradient written into ``grad_out`` when given (it may be
    ``x2`` itself).  ``total`` is None for reduction "none"; ``rows`` may be None for "sum"
    and "mean" (use ``total``).  ``variant`` pins a fused kernel variant (CuPy; tests and the
    benchmark).  Used by softmax_cross_entropy, the block walk and the chunked linear model."""
    predicted = predicted_tokens(xp, x2, args) if args.return_stats else None
    if xp is np:
        from ._sce_numpy import softmax_cross_entropy as run

        out = run(x2, target, weight, args, grad_out)
    else:
        from ._cuda.sce import softmax_cross_entropy as run

        out = run(x2, target, weight, args, grad_out, impl=resolve_impl(impl), variant=variant)
    if predicted is None:
        return out
    return out._replace(stats=out.stats._replace(predicted=predicted))


def run_token_rows(xp, x2, labels, args, logp_out, entropy_out=None, grad_out=None,
                   g_logp=None, g_entropy=None):
    """Token log-probabilities and entropy of validated (N, C) logits (:mod:`gpuce.tokens`),
    written into the outputs; the gradient into ``grad_out`` when given (it may be ``x2``)."""
    from ._tokens_rows import token_rows

    token_rows(xp, x2, labels, args, logp_out, entropy_out, grad_out, g_logp, g_entropy)


def explain_rows(xp, logits, target, args, impl, walk) -> list:
    """gpuce.explain's lines for the backend and the path :func:`run_rows` takes: NumPy's
    chunked passes, or on CuPy the implementation (and why) and, on the fused path, the
    kernel variant (``gpuce._cuda.fused.explain``) or, for walked logits (``walk``), that one is
    chosen per row block."""
    if xp is np:
        return ["backend: NumPy (the logits are a numpy.ndarray)",
                f"path: gpuce._sce_numpy: chunked passes over the rows on the CPU, "
                f"{args.acc.name} accumulation"]
    lines = ["backend: CuPy (the logits are a cupy.ndarray)"]
    chosen = resolve_impl(impl)
    why = (f"impl={impl!r}" if impl != "auto" else
           f"impl='auto' means {auto_impl()!r} here" + ("" if auto_impl() == "fused" else
                                                     " (set by gpuce.use_impl)"))
    if chosen == "fused" and args.kind == "prob" and target.dtype != logits.dtype:
        chosen = "portable"
        why += (f"; probability targets of {target.dtype} with {logits.dtype} logits are read "
                f"in {args.acc.name} by the portable kernels")
    lines.append(f"path: {chosen} ({why})")
    if chosen == "fused" and walk:
        lines.append("kernel: chosen for each row block as for an (N, C) array of its rows")
    elif chosen == "fused" and args.n:
        from ._cuda import fused

        x2 = logits.reshape(args.n, args.c)
        y2 = None
        if args.kind == "label":
            index = target.dtype.name
            if index not in ("int32", "int64") or (
                    index == "int32" and not -(2**31) <= args.ignore_index < 2**31):
                index = "int64"
        else:
            index = "int32"
            y2 = target.reshape(x2.shape)
        lines.append("kernel: " + fused.explain(x2, args.kind, index, y2, None, softcap=bool(args.softcap)))
    return lines


def column_sums(xp, G, acc):
    """1ᵀ G in ``acc``.  On CuPy (float32/64) a matrix-vector product through cuBLAS: CuPy's
    column reduction G.sum(axis=0) runs one block per column, so with few classes (C = 100)
    it has too few blocks, each reading a strided column."""
    if xp is not np and G.dtype in (np.float32, np.float64):
        return xp.matmul(xp.ones(G.shape[0], G.dtype), G).astype(acc, copy=False)
    return G.sum(axis=0, dtype=acc)


def softmax_rows(xp, x, axis, mode, kernel_name=None):
    """logsumexp (``mode`` "lse"), softmax ("softmax") or log_softmax ("log") of ``x`` along
    ``axis`` (checked by gpuce.softmax).  NumPy: :func:`_softmax_rows_numpy`, in blocks of
    rows.  CuPy: one ReductionKernel pass for the maximum and the log-sum-exp and, for softmax
    and log_softmax, the ElementwiseKernel ``kernel_name`` mapping ``x - lse``."""
    if xp is np:
        return _softmax_rows_numpy(x, axis, mode)
    mx, ls = _lse_parts_cupy(x, axis)
    if mode == "lse":
        return (mx + ls).astype(x.dtype).squeeze(axis)
    from ._cuda.kernels import get_kernel

    acc = acc_dtype(x.dtype)
    return get_kernel(kernel_name, T=x.dtype.name, A=acc.name)(x, mx, ls)


def _softmax_rows_numpy(x, axis, mode):
    """The NumPy path of logsumexp ("lse"), softmax ("softmax") and log_softmax ("log"),
    computed in blocks of rows (:func:`gpuce._blocks.row_blocks` over the other axes) and
    written into the output block by block, so the temporaries are about two blocks of
    NUMPY_BLOCK_ELEMENTS accumulation-dtype elements (at least one row), never the input's
    size.  Per row: m = max_j x_j (a non-finite m is replaced by 0 as ms), t = x - ms,
    ls = log sum_j exp(t); lse = m + ls, log_softmax = t - ls, softmax = exp(t - ls)."""
    acc = acc_dtype(x.dtype)
    xm = np.moveaxis(x, axis, -1)
    lead, c = xm.shape[:-1], xm.shape[-1]
    if mode == "lse":
        out = np.empty(lead, x.dtype)
        if c == 0:
            out.fill(-np.inf)
            return out
        outm = out
    else:
        out = np.empty_like(x)  # the input's memory layout, as an elementwise result
        if c == 0:
            return out
        outm = np.moveaxis(out, axis, -1)
    with np.errstate(all="ignore"):
        for index, _, _ in row_blocks(lead, NUMPY_BLOCK_ELEMENTS // c):
            xb = xm[index]
            m = xb.max(axis=-1, keepdims=True).astype(acc)
            finite = np.isfinite(m)
            ms = np.where(finite, m, 0).astype(acc)
            t = np.subtract(xb, ms, dtype=acc)
            e = np.exp(t)
            ls = np.log(e.sum(axis=-1, keepdims=True))
            lse = np.where(finite, ms, m) + ls
            if mode == "lse":
                outm[index] = lse[..., 0]
                continue
            t -= ls
            if mode == "softmax":
                np.exp(t, out=t)
            np.copyto(t, np.nan, where=~np.isfinite(lse))
            outm[index] = t
    return out


def _lse_parts_cupy(x, axis):
    import cupy as cp

    from ._cuda.kernels import get_kernel

    acc = acc_dtype(x.dtype)
    shape = x.shape[:axis] + (1,) + x.shape[axis + 1:]
    mx, ls = cp.empty(shape, acc), cp.empty(shape, acc)
    if mx.size and x.shape[axis] == 0:
        mx.fill(-np.inf)
        ls.fill(-np.inf)
    elif mx.size:
        get_kernel("gpuce_lse", T=x.dtype.name, A=acc.name)(x, mx, ls, axis=axis, keepdims=True)
    return mx, ls
