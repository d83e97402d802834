"""The linear softmax classifier: scores f = X Wᵀ + b, total loss and its gradients.

``linear_cross_entropy`` never holds the whole N x C logits matrix: it runs on the chunk
driver of :mod:`gpuce._chunks` (the logits GEMM a chunk of ``chunk_size`` rows at a time, chosen
from the free memory unless given; the backward GEMMs from the chunk's gradient), with the
softmax cross-entropy kernels as the row operation: in place over the chunk's logits f_c, they
leave G_c = ∂L/∂f_c scaled by the reduction's α (1/denominator for "mean", computed over all N
rows first), and by the row weights of a backward pass where given.  Peak extra memory is
chunk x C (float32 and, for 16-bit X, 16-bit: 6 bytes a logit) + N x D + C x D.  On the GPU
the products go through cuBLAS (float16 and bfloat16: 16-bit storage, float32 compute) and
‖W‖² is one ReductionKernel.

bfloat16 dW accumulates in a float32 C x D array, rounded to bfloat16 once at the end
(DW_ACCUMULATE).  Rounding dW to bfloat16 after every chunk's GEMM would add one rounding of
relative size up to 2⁻⁸ per chunk, and those add up with the chunk count, where float32
accumulation keeps the error of rounding the exact dW to bfloat16 once (the measurement:
docs/semantics.md, "Large vocabularies").  The price is C x D float32 (twice
bfloat16 dW) of extra memory.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import _dask
from ._backend import array_module, asarray
from ._chunks import chunk_rows, run_chunks
from ._dispatch import backends
from ._rows import check_labels, mean_args, run_rows, sum_squares
from ._results import BlockStats, LinearGrads, results
from ._validation import check_class_weight, check_uint64_labels, linear_args

# dtype in which dW accumulates across chunks, by input dtype (others: the input's own).
# bfloat16 in float32: see the module docstring for the measured errors.
DW_ACCUMULATE = {"bfloat16": np.dtype(np.float32), "float16": np.dtype(np.float32)}


@backends("X", "W", "y", dask=lambda run, arguments: _dask.linear_cross_entropy(run, **arguments))
def linear_cross_entropy(X, W, y, *, bias=None, reg=0.0, reduction="mean", ignore_index=-100,
                         weight=None, label_smoothing=0.0, z_loss=0.0, return_grad=False,
                         input_grad=True, check_finite=True, chunk_size=None,
                         grad_row_scale=None, softcap=None, return_stats=False,
                         check_labels=True, _acc_grads=False, _denominator=None):
    r"""Loss of the linear softmax classifier f = X Wᵀ (+ bias) with L2 penalty on W.

    ``reduction="sum"`` with ``reg=λ`` is the classifier's total loss::

        L_total = Σ_i L_i + λ/2 ‖W‖²,      ∂L_total/∂W = (Ŷ − Y)ᵀ X + λ W

    ``reduction="mean"`` gives ``(1/D) Σ_i L_i + λ/2 ‖W‖²`` (D the mean's denominator of
    :func:`softmax_cross_entropy`: the non-ignored weight sum for labels, N for
    probabilities; with D = 0 the first term and its gradient are 0).  ``reduction="none"``
    returns the per-sample L_i (no penalty); its gradients are those of ``Σ_i L_i + λ/2 ‖W‖²``.  The bias is never penalised.

    Parameters
    ----------
    X : (N, D) float array, NumPy or CuPy: float16, bfloat16 (ml_dtypes), float32 or float64
    W : (C, D) float array of X's dtype (like torch's ``Linear.weight``)
    y : (N,) integer labels or (N, C) probabilities (anything else, a scalar included, is a
        ValueError)
    bias : (C,) array, optional
    reg : float >= 0
        λ, the L2 penalty on W.
    reduction, ignore_index, weight, label_smoothing, z_loss
        As in :func:`softmax_cross_entropy` (class weights finite and >= 0: one small
        read on the GPU; labels are checked, uint64 included, before any work).
    return_grad : bool
        Also return :class:`LinearGrads` ``(X, W, bias)`` of the returned loss.
    input_grad : bool
        Compute dX (one GEMM); a trainer that needs only dW passes False (grads.X is None).
    check_finite : bool
        Reject non-finite X, W, bias (one pass and one sync each); trainers that
        validated their data once pass False.
    chunk_size : int, optional
        Rows per chunk (at most; the last chunk may be shorter).  None chooses it from the
        problem and the free memory (see ``gpuce._chunks.AUTO_CHUNK_*``): small problems run in one
        chunk, large vocabularies in chunks whose logits buffer is about 8 % of the
        gradient outputs.  Results do not depend on it beyond rounding.

    grad_row_scale : (N,) array, optional
        With reduction="none" and return_grad=True: return the gradients of
        Σ_i g_i L_i + λ/2 ‖W‖² instead (the row weights of a backward pass; gpuce.torch).
    softcap : float > 0, optional
        The loss reads g = softcap · tanh(f / softcap) of each chunk's logits f (in the
        chunk buffer); the gradients chain through it, G = ∂L/∂g · (1 − tanh²(f/softcap)).
    return_stats : bool
        Also return a :class:`gpuce.SceStats` (z-loss part, token accuracy, per-row lse of
        the (capped) logits), as in :func:`softmax_cross_entropy`.  ``loss - z_loss`` is
        the loss without the z-loss (the L2 penalty stays in it).
    check_labels : bool, default True
        As in :func:`softmax_cross_entropy`: False skips the label range check (no host
        sync for it); a bad label gives a NaN row (and a NaN "sum"/"mean" loss).

    X, y may also be dask arrays chunked by rows (see :mod:`gpuce._dask`); the results
    are then dask arrays.  (``_acc_grads``, private: gradients left in the accumulation
    dtype, float32 for float16/bfloat16, for the dask path to round them once; ``_denominator``, private: the mean's denominator of
    a larger call whose row block X is, from the dask path.)

    Returns
    -------
    loss, (loss, grads), (loss, stats) or (loss, grads, stats)
        loss in float32 for float16/bfloat16/float32 X, float64 for float64; the gradients
        in X's dtype.  For float16 and bfloat16 the logits of each chunk are X_c Wᵀ computed
        in float32 and rounded to X's dtype (as torch's F.linear), the cross-entropy is
        computed in float32, and every gradient is rounded once from float32 to nearest
        even; bfloat16 dW accumulates over the chunks in float32 (see DW_ACCUMULATE).
    """
    xp = array_module(X, W, y, bias, weight, grad_row_scale)
    X, W, y, bias, weight = (asarray(xp, v) for v in (X, W, y, bias, weight))
    reg, chunk_size, args = linear_args(
        xp, X, W, y, bias=bias, reg=reg, weight=weight, chunk_size=chunk_size,
        check_finite=check_finite, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, return_grad=return_grad,
        softcap=softcap, return_stats=return_stats, check_labels=check_labels)
    n, d = X.shape
    c = W.shape[0]
    if grad_row_scale is not None:
        grad_row_scale = asarray(xp, grad_row_scale)
        if args.reduction != "none" or not return_grad:
            raise ValueError("grad_row_scale needs reduction='none' and return_grad=True")
        if grad_row_scale.shape != (n,):
            raise ValueError(f"grad_row_scale must have shape ({n},), got {grad_row_scale.shape}")
    acc = args.acc
    check_class_weight(xp, weight)
    if weight is not None:
        weight = xp.ascontiguousarray(weight.astype(acc, copy=False))
    if args.kind == "label" and n:
        check_uint64_labels(xp, y, args)  # before any int64 cast, which would wrap them
        if args.check_labels:
            check_label_range(xp, y, args)  # over all rows first: errors name the caller's position
    if _denominator is None:  # the whole call's, and for class weights its z-loss coefficient
        args = mean_args(xp, y, weight, args)
    elif args.reduction == "mean":  # a dask block: the caller's (z_loss set by the caller too)
        args = replace(args, denominator=float(_denominator))
    # cuBLAS reads dense rows: W whole (the size of dW), X a chunk at a time (below), so that an
    # X in another order (Fortran, strided) costs a chunk-sized copy, never a copy of X
    W = xp.ascontiguousarray(W)

    dX = dW = db = None
    if return_grad:
        dw_dtype = acc if _acc_grads else DW_ACCUMULATE.get(W.dtype.name, W.dtype)
        # every chunk adds with beta = 1; λW formed in the accumulation dtype
        dW = (W.astype(dw_dtype) * dw_dtype.type(reg) if dw_dtype != W.dtype
              else W * W.dtype.type(reg)) if reg else xp.zeros(W.shape, dw_dtype)
        dX = xp.empty((n, d), acc if _acc_grads else X.dtype) if input_grad else None
        db = xp.zeros(c, acc) if bias is not None else None
    grads_bytes = (dW.nbytes + (dX.nbytes if dX is not None else 0)) if return_grad else 0
    rows = chunk_rows(xp, X, c, acc, chunk_size, backward=return_grad, grads_bytes=grads_bytes)

    # each chunk runs with the call's reduction and, for "mean", the whole call's denominator:
    # its gradient G_c is scaled inside the kernels, before the driver rounds it to X's dtype
    per_chunk = replace(args, inplace=return_grad, labels_checked=True)
    loss_rows = xp.empty(n, acc) if args.reduction == "none" else None
    total = xp.zeros((), np.float64)
    stats = BlockStats(xp, args) if args.return_stats else None

    def rows_op(s, e, f):
        """The softmax cross-entropy of rows s:e from their logits f; f becomes
        G_c = ∂(Σ_c g_i L_i)/∂f_c (g = 1 unless grad_row_scale) when gradients are wanted."""
        nonlocal total
        chunk_args = replace(per_chunk, lead_shape=(e - s,), n=e - s)
        r, t, st = run_rows(xp, f, y[s:e], weight, chunk_args, f if return_grad else None)
        if grad_row_scale is not None:  # f in the accumulation dtype: one rounding
            f *= grad_row_scale[s:e, None].astype(acc, copy=False)
        if loss_rows is not None:
            loss_rows[s:e] = r
        else:
            total += t
        if stats is not None:
            stats.add(s, e, st, y[s:e])

    run_chunks(xp, X, W, bias, acc, rows, rows_op, dW=dW, dX=dX, db=db)
    if loss_rows is not None:
        loss = loss_rows
    else:  # "mean": each chunk's sum was divided by the whole call's denominator already
        loss = xp.asarray(total, dtype=acc)
        if reg:
            loss = loss + acc.type(0.5 * reg) * sum_squares(xp, W).astype(acc)
    grads = None
    if return_grad:
        if _acc_grads:
            grads = LinearGrads(dX, dW, db)
        else:
            if dW.dtype != W.dtype:
                dW = dW.astype(W.dtype)  # the float32 accumulation rounded once (to nearest even)
            grads = LinearGrads(dX, dW, None if db is None else db.astype(X.dtype))
    st = stats.finish() if stats is not None else None
    return results(xp, args, loss, grads, st)


# linear_cross_entropy's check_labels argument shadows the function inside it
check_label_range = check_labels
