"""The row work whose code differs by backend, each decision written once: the label range
check, the "mean" reduction's denominator, the L2 penalty's sum of squares, the softmax cross-
entropy rows (NumPy or CuPy backend), the token log-probability and distillation rows (on CuPy
the fused kernels where :func:`token_route` / :func:`distill_route` say they take the call, the
array rows otherwise), the block walk's block size, the bias gradient's column sums and the
row-wise softmax / log_softmax / logsumexp.  Used by the block walk (gpuce.sce), the chunked
linear model (gpuce.linear), token log-probabilities (gpuce.tokens), distillation
(gpuce.distillation), the row-wise functions (gpuce.softmax), explain (gpuce._explain) and the
dask blocks (gpuce._dask); the modules above call these and do not branch on the backend
themselves."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._blocks import row_blocks
from ._impl import FUSED_MIN_ARCH, auto_impl, device_impl, resolve_impl
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

        out = run(x2, target, weight, args, grad_out, impl=device_impl(impl), variant=variant)
    if predicted is None:
        return out
    return out._replace(stats=out.stats._replace(predicted=predicted))


class Route(NamedTuple):
    """Which rows a token or distillation call on CuPy arrays runs: ``path`` "fused" (the
    fused kernels) or "array" (the array-generic rows), and why."""

    path: str
    reason: str


def layout(a):
    """What the routing reads of an array: (dtype name, shape, strides in bytes); None stays
    None."""
    return None if a is None else (a.dtype.name, tuple(a.shape), tuple(a.strides))


def _kernel_rows(lay, row_unit: int) -> str | None:
    """Why the fused kernels cannot walk the (N, C) rows of ``lay`` (None when they can): the
    columns must be contiguous (any column stride with C = 1) and the row stride a
    non-negative whole number of ``row_unit``-byte elements (the kernels take it in elements
    of the logits' dtype)."""
    from ._cuda.fused import ITEMSIZE

    name, shape, strides = lay
    if len(shape) != 2:
        return f"{len(shape)}-D, not (N, C)"
    own = ITEMSIZE[name]
    if shape[1] > 1 and strides[1] != own:
        return f"a column stride of {strides[1]} bytes (the kernels read contiguous rows)"
    if shape[0] > 1 and (strides[0] < 0 or strides[0] % row_unit or strides[0] % own):
        return f"a row stride of {strides[0]} bytes"
    return None


def token_route(impl: str, acc: str, ignore_index: int, logits, grad=None) -> Route:
    """Whether :func:`run_token_rows` on CuPy arrays launches the fused token kernels
    (:func:`gpuce._cuda.tokens.token_rows`) or runs the array rows
    (:func:`gpuce._tokens_rows.token_rows`): the one place this is decided.  Pure: it reads
    ``impl`` ("fused" or "portable", as :func:`gpuce._impl.device_impl` gives it), the
    accumulation dtype's name, ignore_index and the :func:`layout` of the (N, C) logits and
    of the gradient output (None without one), so the CPU tests call it with plain values.

    The fused kernels take logits of float16, bfloat16, float32 or float64 accumulating in
    their own accumulation dtype; at most ``MAX_ROWS`` rows and ``MAX_CLASSES`` classes;
    contiguous rows at any row stride (:func:`_kernel_rows`); labels of any integer dtype
    (int32 and int64 read as they are, others converted to int64); an ignore_index in the
    int64 range whose lower 32 bits name no class; a gradient of (N, C) in the logits' dtype
    or the accumulation dtype, contiguous rows.  Anything else runs the array rows."""
    from ._cuda import fused as F
    from ._cuda import tokens as K

    if impl != "fused":
        return Route("array", f"impl {impl!r} (gpuce.use_impl): the portable path runs the array rows")
    dtype, shape, _ = logits
    n, c = shape
    if dtype not in F.DTYPES:
        return Route("array", f"{dtype} logits (the fused token kernels take {', '.join(F.DTYPES)})")
    if acc != F.ACC[dtype]:
        return Route("array", f"{dtype} logits accumulating in {acc}, not {F.ACC[dtype]}")
    if n > K.MAX_ROWS:
        return Route("array", f"{n} rows (the fused token kernels take at most {K.MAX_ROWS})")
    if c > F.MAX_CLASSES:
        return Route("array", f"{c} classes (the fused kernels take at most {F.MAX_CLASSES})")
    if not -(2**63) <= ignore_index < 2**63:
        return Route("array", f"ignore_index {ignore_index} is outside the int64 range")
    try:
        K._check_ignore_index(ignore_index, c)
    except ValueError:
        return Route("array", f"ignore_index {ignore_index}'s lower 32 bits name a class (the "
                              f"fused token kernels compare those)")
    why = _kernel_rows(logits, F.ITEMSIZE[dtype])
    if why:
        return Route("array", f"the logits have {why}")
    if grad is not None:
        gname, gshape, _ = grad
        if gshape != (n, c) or gname not in (dtype, acc):
            return Route("array", f"a gradient output of {gname} {gshape} (the fused token kernels "
                                  f"write ({n}, {c}) of {dtype} or {acc})")
        why = _kernel_rows(grad, F.ITEMSIZE[dtype])
        if why:
            return Route("array", f"the gradient output has {why}")
    return Route("fused", f"{dtype} logits, {acc} accumulation: gpuce._cuda.tokens.token_rows, "
                          f"one launch")


def run_token_rows(xp, x2, labels, args, logp_out, entropy_out=None, grad_out=None,
                   g_logp=None, g_entropy=None):
    """Token log-probabilities and entropy of validated (N, C) logits (:mod:`gpuce.tokens`),
    written into the outputs; the gradient into ``grad_out`` when given (it may be ``x2``).
    ``labels`` are checked by the caller (in [0, C) or ignore_index).  NumPy: the array rows.
    CuPy: the fused token kernels where :func:`token_route` says they take the call (impl
    "auto" as :func:`gpuce.use_impl` sets it), the array rows otherwise."""
    if xp is not np and token_route(device_impl(), args.acc.name, args.ignore_index,
                                    layout(x2), layout(grad_out)).path == "fused":
        from ._cuda.tokens import token_rows as fused_rows

        fused_rows(x2, labels, acc=args.acc, inv_temperature=args.inv_temperature,
                   softcap=args.softcap, ignore_index=args.ignore_index, logp_out=logp_out,
                   entropy_out=entropy_out, grad_out=grad_out, g_logp=g_logp, g_entropy=g_entropy)
        return
    from ._tokens_rows import token_rows

    token_rows(xp, x2, labels, args, logp_out, entropy_out, grad_out, g_logp, g_entropy)


def distill_route(impl: str, beta: float, sparse: bool, acc: str, student, teacher,
                  grad=None) -> Route:
    """Whether :func:`run_distill_rows` on CuPy arrays launches the fused distillation kernels
    (:func:`gpuce._cuda.distill.distill_rows_fused`) or runs the array rows
    (:func:`gpuce._distill_rows.dense_rows`): the one place this is decided.  Pure: it reads
    ``impl`` ("fused" or "portable"), β, whether the teacher is sparse, the accumulation
    dtype's name and the :func:`layout` of the (N, C) student and teacher logits and of the
    gradient output (None without one).

    The fused kernels take β = 0 (forward KL) and β = 1 (reverse KL) of a dense teacher;
    student and teacher of one dtype (float16, bfloat16, float32 or float64) and one shape,
    accumulating in that dtype's accumulation dtype; at most ``MAX_CLASSES`` classes;
    contiguous rows at any row stride (:func:`_kernel_rows`); a gradient of the student's
    dtype and shape, contiguous rows.  Anything else (the generalised JSD, a float32 student
    with a float64 teacher, ...) runs the array rows."""
    from ._cuda import distill as K
    from ._cuda import fused as F

    if impl != "fused":
        return Route("array", f"impl {impl!r} (gpuce.use_impl): the portable path runs the array rows")
    if float(beta) not in K.BETAS:
        return Route("array", f"beta={beta}: the fused distillation kernels do beta = 0 and 1 "
                              f"(the generalised JSD runs on the array rows)")
    if sparse:
        return Route("array", "a sparse (top-k) teacher")
    dtype, shape, _ = student
    tname, tshape, _ = teacher
    if dtype not in F.DTYPES:
        return Route("array", f"a {dtype} student (the fused kernels take {', '.join(F.DTYPES)})")
    if tname != dtype or tshape != shape:
        return Route("array", f"student {dtype} {shape}, teacher {tname} {tshape} (the fused "
                              f"kernels take one dtype and one shape)")
    if acc != F.ACC[dtype]:
        return Route("array", f"{dtype} logits accumulating in {acc}, not {F.ACC[dtype]}")
    n, c = shape
    if c > F.MAX_CLASSES:
        return Route("array", f"{c} classes (the fused kernels take at most {F.MAX_CLASSES})")
    for lay, what in ((student, "the student"), (teacher, "the teacher")):
        why = _kernel_rows(lay, F.ITEMSIZE[dtype])
        if why:
            return Route("array", f"{what} has {why}")
    if grad is not None:
        gname, gshape, _ = grad
        if gname != dtype or gshape != (n, c):
            return Route("array", f"a gradient output of {gname} {gshape} (the fused kernels "
                                  f"write the student's dtype and shape)")
        why = _kernel_rows(grad, F.ITEMSIZE[dtype])
        if why:
            return Route("array", f"the gradient output has {why}")
    kl = "forward" if float(beta) == 0.0 else "reverse"
    return Route("fused", f"{kl} KL of {dtype} logits: gpuce._cuda.distill.distill_rows_fused, "
                          f"one launch")


def run_distill_rows(xp, S2, T2, args, active, loss_out, grad_out=None, row_scale=None):
    """Distillation rows of validated (N, C) student and dense teacher logits
    (:mod:`gpuce.distillation`): the loss per row into ``loss_out`` and, with ``grad_out``,
    ∂(Σ σ_i L_i)/∂S (σ = ``row_scale``: (N,) accumulation-dtype rows or a number) into it (it
    may be ``S2``); ``active``: (N,) booleans, False for an ignored row.  NumPy: the array
    rows (:func:`gpuce._distill_rows.dense_rows`).  CuPy: the fused kernels where
    :func:`distill_route` says they take the call (impl "auto" as :func:`gpuce.use_impl`
    sets it), the array rows otherwise -- and should the kernels' host code still refuse the
    call (NotImplementedError, raised before anything is launched or written), the array
    rows too."""
    from ._distill_rows import dense_rows

    if xp is not np and distill_route(device_impl(), args.beta, args.sparse, args.acc.name,
                                      layout(S2), layout(T2), layout(grad_out)).path == "fused":
        from ._cuda.distill import distill_rows_fused

        try:
            distill_rows_fused(S2, T2, args, active, loss_out, grad_out, row_scale)
            return
        except NotImplementedError:
            pass  # refused before any launch: nothing written, the array rows below
    dense_rows(xp, S2, T2, args, active, loss_out, grad_out, row_scale)


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
    if chosen == "fused" and device_impl(impl) == "portable":
        chosen = "portable"
        why += (f"; the fused kernels need compute capability {FUSED_MIN_ARCH // 10}.0 or later, this "
                f"device has less")
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
