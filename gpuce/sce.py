"""softmax_cross_entropy: per-sample softmax cross-entropy with its fused gradient.

This module only checks arguments and shapes the result; :func:`gpuce._rows.run_rows` hands the
rows to the backend, :mod:`gpuce._sce_numpy` (CPU) or :mod:`gpuce._cuda.sce` (GPU kernels).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import _dask
from ._backend import array_module, asarray, shares_buffer
from ._blocks import row_blocks, rows_viewable
from ._dispatch import backends
from ._impl import check_impl
from ._rows import check_labels, mean_args, run_rows, walk_block_elements
from ._results import BlockStats, results
from ._validation import (SceArgs, check_class_weight, check_inplace_aliasing,
                          check_uint64_labels, sce_args)


@backends("logits", "target", dask=lambda run, arguments: _dask.softmax_cross_entropy(run, **arguments))
def softmax_cross_entropy(logits, target, *, reduction="mean", ignore_index=-100, weight=None,
                          label_smoothing=0.0, z_loss=0.0, return_grad=False, inplace=False,
                          impl="auto", softcap=None, return_stats=False, check_labels=True):
    r"""Softmax cross-entropy of logits against class labels or class probabilities.

    For row i with logits f_i (C classes), ``lse_i = log sum_j exp(f_ij)`` and
    ``log q_ij = f_ij - lse_i``.  With weight w (ones if None) and smoothing eps:

    * integer labels k_i (non-ignored rows)::

        L_i = (1-eps) w_{k_i} (lse_i - f_{i,k_i}) + (eps/C) sum_c w_c (lse_i - f_ic) + z lse_i^2

      ignored rows (k_i == ignore_index) give L_i = 0 and a zero gradient.
      ``mean`` divides sum_i L_i by sum_i w_{k_i} over non-ignored rows (as torch); when
      that sum is 0 (every row ignored, or every non-ignored row's class weighted 0) the
      mean is 0 with a zero gradient (torch: NaN).
    * probabilities P (same shape as logits), ``p'_ic = (1-eps) p_ic + eps/C``::

        L_i = sum_c w_c p'_ic (lse_i - f_ic) + z lse_i^2

      ``mean`` divides by the number of rows N (as torch).

    The gradient is ``dL_i/df_ij = q_ij G_i - coef_ij - (1-eps) w_{k_i} [j = k_i]`` with
    ``G_i = sum_c coef_ic + (1-eps) w_{k_i} + 2 z lse_i`` (the textbook ``ŷ - y`` for
    eps = z = 0, unit weights), times the reduction's scale.

    With ``softcap=s`` every formula above reads the capped logits ``g_ij = s tanh(f_ij / s)``
    (Gemma 2/3) in place of f, and the gradient chains through the cap::

        dL_i/df_ij = dL_i/dg_ij (1 - tanh^2(f_ij / s))

    The capped values are formed in the same pass, never stored as a copy of the logits.

    Parameters
    ----------
    logits : numpy.ndarray or cupy.ndarray, shape (..., C), float16, bfloat16
        (``ml_dtypes.bfloat16``), float32 or float64
        Class axis last; any strides.  float16 and bfloat16 accumulate in float32.
        Leading dimensions that do not merge into one row axis (e.g.
        ``(T, B, C).transpose(1, 0, 2)``) are walked in row blocks: extra memory is one
        block, never a copy of the logits.
    target : array, shape (...) integer labels (any integer dtype; uint64 values above
        int64's maximum are out of range) or shape (..., C) float probabilities (any of the
        float dtypes above, read in the accumulation dtype: float16 targets with bfloat16
        logits are not rounded to bfloat16)
    reduction : {"mean", "sum", "none"}
        "mean" with a zero denominator (no non-ignored rows, or a zero weight sum over
        them) is 0 with a zero gradient, not NaN.
    ignore_index : int, default -100
        Label value whose rows are skipped (integer labels only; as torch, a
        non-negative value is an error with probability targets).
    weight : array of shape (C,), optional
        Per-class weight (torch's ``weight``): any finite values, negative and zero ones
        included, as torch (the mean divides by their sum over the non-ignored rows).
        Checking that reads the values: on CuPy one small reduction and one host read.
    label_smoothing : float in [0, 1]
    z_loss : float >= 0
        Adds ``z_loss * lse_i**2`` per non-ignored row before the reduction (PaLM).
    return_grad : bool
        Also return ``grad = d loss / d logits`` (for reduction "none": the gradient
        of ``sum_i L_i``), same shape and dtype as logits, from the same pass.
    inplace : bool
        Write ``grad`` into ``logits`` (needs return_grad=True); otherwise the
        caller's arrays are never written.  Not for dask arrays.  The target and the
        weight must not share memory with the logits (ValueError).
    impl : {"auto", "fused", "portable"}
        GPU implementation ("auto": "fused", or what :func:`gpuce.use_impl` chose for the
        calls in its ``with`` block): "fused" is the single-read RawKernel family
        (kernels/gpuce_sce_fused.cu), "portable" the ElementwiseKernel /
        ReductionKernel path (two reads of the logits).  NumPy inputs always take the
        NumPy path.
    softcap : float > 0, optional
        Logit soft-capping ``g = softcap * tanh(f / softcap)`` before the loss (None: off).
        Finite and > 0 (ValueError otherwise).
    return_stats : bool
        Also return a :class:`gpuce.SceStats` ``(z_loss, accuracy, lse)`` computed in the
        same pass (see Returns).
    check_labels : bool, default True
        False skips the label range check (on CuPy: no host synchronisation at all, for
        training loops that want none): a label outside [0, C) other than ignore_index is
        then not reported; its row's loss and gradient are NaN (so is a "sum"/"mean" loss),
        it adds nothing to the mean's denominator and counts as a wrong prediction.  Never
        an out-of-bounds read.  On CuPy the class weights are checked by the same read-back:
        with False a NaN or infinite weight gives NaN results instead of the
        ValueError (NumPy still raises).

    Dask arrays chunked by rows (class axis whole) are accepted for logits and target: the
    results are then dask arrays (see :mod:`gpuce._dask`).

    Returns
    -------
    loss : array
        float32 for float16/bfloat16/float32 logits, float64 for float64; shape (...) for
        "none", 0-d for "sum"/"mean".
    grad : array, only with return_grad=True
        The logits' dtype; for float16 and bfloat16 the float32 gradient rounded once, to
        nearest even.
    stats : SceStats, only with return_stats=True (last)
        ``z_loss``: the z-loss part ``sum_i z lse_i^2`` over the non-ignored rows, reduced
        like the loss (divided by the mean's denominator for "mean"), so ``loss - z_loss``
        is the loss without it.  ``accuracy`` (integer labels; None for probability
        targets): the share of non-ignored rows whose label attains the row maximum of the
        (capped) logits; ties count as correct, a row with a NaN or whose maximum is not
        finite counts as wrong; NaN when no row is counted.  ``lse``: shape (...), the
        accumulation dtype, the log-sum-exp of the (capped) logits of every row, ignored
        rows included.  With reduction="none" the first two are per row instead (one rule):
        ``z_loss`` z lse_i^2 (0 for ignored rows) and ``accuracy`` 1.0 / 0.0 (NaN for
        ignored rows).

    Notes
    -----
    A row whose logits contain NaN or +inf, or are all -inf, has a NaN loss and a
    NaN gradient row (unless ignored).  A -inf logit whose target mass is 0 adds
    nothing (finite loss); target mass on a -inf logit gives +inf.

    Raises
    ------
    TypeError
        Non-float logits, non-integer/non-float target, NumPy mixed with CuPy.
    ValueError
        Bad shapes, a label outside [0, C) other than ignore_index (naming the
        first bad position and the caller's value, uint64 included), unknown reduction,
        weight of wrong length or with a NaN or infinite entry,
        label_smoothing outside [0, 1], negative z_loss, inplace without return_grad,
        inplace with a target or weight that shares memory with the logits, softcap <= 0,
        NaN or infinite (a bool softcap or flag is a TypeError).

    See Also
    --------
    torch.nn.functional.cross_entropy
    """
    check_impl(impl)
    xp = array_module(logits, target, weight)
    if inplace is True and not getattr(getattr(logits, "dtype", None), "isnative", True):
        raise ValueError(f"inplace=True needs logits in native byte order, got {logits.dtype}: "
                         "the gradient would be written into a native-order copy")
    logits, target, weight = (asarray(xp, v) for v in (logits, target, weight))
    args = sce_args(logits, target, reduction=reduction, ignore_index=ignore_index, weight=weight,
                    label_smoothing=label_smoothing, z_loss=z_loss, return_grad=return_grad,
                    inplace=inplace, softcap=softcap, return_stats=return_stats,
                    check_labels=check_labels)
    check_uint64_labels(xp, target, args)
    check_class_weight(xp, weight)
    check_inplace_aliasing(xp, logits, target, weight, args)
    if args.z_loss and weight is not None and args.kind == "label" and args.n:
        # "mean" with class weights: z-loss over the non-ignored rows, unweighted
        args = mean_args(xp, target, weight, args)
    if args.n and not rows_viewable(logits.shape, logits.strides):
        return walk_blocks(xp, logits, target, weight, args, impl)
    c = args.c
    if logits.ndim == 2:  # already (N, C)
        x2, tgt = logits, target
    else:
        x2 = logits.reshape(args.n, c)
        tgt = target.reshape(args.n) if args.kind == "label" else target.reshape(args.n, c)

    grad_out = None
    if args.return_grad:
        if args.inplace and shares_buffer(xp, x2, logits):
            grad_out = x2
        else:
            grad_out = xp.empty((args.n, c), dtype=logits.dtype)
    if args.n == 0:
        rows = xp.zeros(0, args.acc)
        total = None if args.reduction == "none" else xp.zeros((), args.acc)
        st = BlockStats(xp, args).finish() if args.return_stats else None
    else:
        rows, total, st = run_rows(xp, x2, tgt, weight, args, grad_out, impl)
    loss = (rows.reshape(args.lead_shape) if args.reduction == "none"
            else xp.asarray(total, dtype=args.acc))
    grad = None
    if args.return_grad:
        if args.inplace:
            if grad_out is not x2:
                logits[...] = grad_out.reshape(logits.shape)
            grad = logits
        else:
            grad = grad_out.reshape(logits.shape)
    return results(xp, args, loss, grad, st)


def walk_blocks(xp, logits, target, weight, args: SceArgs, impl="auto"):
    """softmax_cross_entropy of logits that have no (N, C) view (leading dimensions that do
    not merge, e.g. ``(T, B, C).transpose(1, 0, 2)``), without copying them whole.

    Labels are checked and the mean's denominator computed over all rows first (the chunked
    linear model's helpers); then blocks of consecutive rows (:func:`gpuce._blocks.row_blocks`)
    run through :func:`gpuce._rows.run_rows` with the call's reduction and, for "mean", the whole
    call's denominator (``SceArgs.denominator``), so that each block's gradient is scaled
    before it is rounded to the logits' dtype, once, as in the unwalked call; the gradient is
    written through each block's view of the caller-shaped output.  Extra memory: one block's
    copy of the logits (and target) when the block itself has no (rows, C) view, plus the
    backend's own chunk buffers.
    """
    c = args.c
    if args.kind == "label" and args.check_labels:
        check_labels(xp, target, args)  # over all rows first: errors name the caller's position
    per_block = replace(args, labels_checked=True)
    if args.denominator is None:
        per_block = mean_args(xp, target, weight, per_block)
    grad = None
    if args.return_grad:
        grad = logits if args.inplace else xp.empty(logits.shape, logits.dtype)
    loss_rows = xp.empty(args.n, args.acc) if args.reduction == "none" else None
    total = xp.zeros((), np.float64)
    stats = BlockStats(xp, args) if args.return_stats else None
    for index, r0, r1 in row_blocks(args.lead_shape, walk_block_elements(xp) // c):
        m = r1 - r0
        xb = logits[index]
        x2 = xb.reshape(m, c)  # a copy of this block alone when the block has no view
        tb = target[index].reshape((m,) if args.kind == "label" else (m, c))
        gb = None
        if grad is not None:
            # inplace: into the logits' block (its copy, written back below, when x2 is one);
            # otherwise the C-ordered output, whose blocks are always (m, C) views
            gb = x2 if args.inplace else grad[index].reshape(m, c)
        rows, t, st = run_rows(xp, x2, tb, weight, replace(per_block, lead_shape=(m,), n=m), gb,
                               impl)
        if loss_rows is not None:
            loss_rows[r0:r1] = rows
        else:
            total += xp.asarray(t, dtype=np.float64)
        if stats is not None:
            stats.add(r0, r1, st, tb)
        if gb is not None and args.inplace and not shares_buffer(xp, x2, xb):
            xb[...] = gb.reshape(xb.shape)
    if loss_rows is not None:
        loss = loss_rows.reshape(args.lead_shape)
    else:  # "mean": each block's sum was divided by the whole call's denominator already
        loss = xp.asarray(total, dtype=args.acc)
    st = stats.finish() if stats is not None else None
    return results(xp, args, loss, grad, st)
