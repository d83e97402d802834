"""Distillation from logits: the student's loss against a teacher's softmax, forward or reverse
KL or the generalised Jensen–Shannon divergence, at a temperature, from logits (dense or a
sparse top-k teacher) or straight from both models' hidden states.

With p_S = softmax(cap(S) / τ) and p_T = softmax(cap(T) / τ) per row (cap(f) = s tanh(f / s)
with a softcap, applied to both before the temperature; the identity without):

* β = 0: KL(p_T ‖ p_S), the forward KL;
* β = 1: KL(p_S ‖ p_T), the reverse KL;
* 0 < β < 1: with M = β p_T + (1 − β) p_S, L = β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M) (the
  generalised JSD as TRL and Liger-Kernel define it).

No τ² factor is applied (multiply the loss by τ² yourself to keep the gradient's scale across
temperatures, as Hinton et al. suggest).  The gradient is with respect to the student's logits;
the teacher is a constant.  Row formulas: :mod:`gpuce._distill_rows`.  The dense rows run
through :func:`gpuce._rows.run_distill_rows`: on CuPy arrays the fused kernels take the forward
and reverse KL (:func:`gpuce._rows.distill_route` says when), the array rows the rest.
"""

from __future__ import annotations

import numpy as np

from . import _dask
from ._backend import array_module, asarray
from ._chunks import chunk_rows, run_chunks
from ._blas import gemm
from ._dispatch import backends
from ._results import LinearGrads
from ._rows import run_distill_rows
from ._validation import (ShapeOnly, check_chunk_size, check_flag, check_linear_args,
                          distill_args, label_error)


def _active_rows(xp, target, args, check=True):
    """Rows that count: not ignored (all rows without a target); labels checked first (one
    sync on CuPy) unless ``check`` is False (the caller checked these labels already)."""
    if target is None:
        return xp.ones(args.n, bool)
    t = target.reshape(-1).astype(np.int64, copy=False)
    active = t != args.ignore_index
    if not check:
        return active
    bad = active & ((t < 0) | (t >= args.c))
    if args.n and bool(bad.any()):
        pos = int(xp.argmax(bad))
        raise label_error(pos, int(t[pos]), args.lead_shape, args.c, args.ignore_index)
    return active


def _check_sparse(xp, idx, lp, args):
    """Indices in [0, C) and distinct in every row; log-probabilities ≤ 0 (or −inf)."""
    if idx.size == 0:
        return
    flat = idx.reshape(-1, args.k).astype(np.int64, copy=False)
    bad = (flat < 0) | (flat >= args.c)
    if bool(bad.any()):
        row = int(xp.argmax(bad.any(axis=1)))
        raise ValueError(f"the sparse teacher's indices must be in [0, {args.c}); row {row} "
                         f"holds {flat[row].tolist()}")
    srt = xp.sort(flat, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
    if bool(dup.any()):
        row = int(xp.argmax(dup))
        raise ValueError(f"the sparse teacher's indices must be distinct in each row; row {row} "
                         f"repeats one")
    lpf = lp.reshape(-1, args.k)
    if bool((lpf > 0).any()):
        raise ValueError("the sparse teacher's log_probs must be <= 0 (log-probabilities)")


def _row_scale(xp, args, active, grad_row_scale, denominator):
    """(σ for the gradient: a number or (N,) rows, the mean's denominator)."""
    denom = float(active.sum()) if denominator is None else float(denominator)
    if grad_row_scale is not None:
        return grad_row_scale.reshape(-1).astype(args.acc, copy=False), denom
    return args.mean_scale(denom), denom


def _reduce(xp, args, loss_rows, denom):
    if args.reduction == "none":
        return loss_rows.reshape(args.lead_shape)
    total = float(loss_rows.sum(dtype=np.float64))
    if args.reduction == "mean":
        total = args.mean_scale(denom) * total
    return xp.asarray(total, dtype=args.acc)


def _check_row_scale(args, grad_row_scale):
    if grad_row_scale is None:
        return
    if args.reduction != "none" or not args.return_grad:
        raise ValueError("grad_row_scale needs reduction='none' and return_grad=True")
    if tuple(grad_row_scale.shape) != args.lead_shape:
        raise ValueError(f"grad_row_scale must have shape {args.lead_shape}, got "
                         f"{tuple(grad_row_scale.shape)}")


@backends("student_logits", "teacher_logits", "target",
          dask=lambda run, arguments: _dask.distillation_loss(run, **arguments))
def distillation_loss(student_logits, teacher_logits, target=None, *, beta=0.0, temperature=1.0,
                      ignore_index=-100, reduction="mean", softcap=None, return_grad=False,
                      grad_row_scale=None, _denominator=None, _labels_checked=False):
    r"""The distillation loss of student logits against a teacher's (module docstring).

    Parameters
    ----------
    student_logits : (..., C) float array, NumPy or CuPy (float16, bfloat16, float32, float64)
    teacher_logits : (..., C) float array of the same shape (any of those dtypes), or a
        sparse top-k teacher ``(indices, log_probs)``, both (..., k): class indices (distinct
        in a row, in [0, C)) and their log-probabilities, as offline distillation data stores
        them.  A sparse teacher takes beta = 0: L = Σ_{j ∈ top-k} p_T,j (log p_T,j − log
        p_S,j) with the student's full softmax; the log-probabilities are used as given (no
        renormalisation): the teacher's tail mass 1 − Σ_{top-k} p_T adds nothing to the loss
        or the gradient, and the gradient is P p_S − p_T on the support with P = Σ_{top-k}
        p_T.  The temperature and softcap apply to the student only (the teacher's
        log-probabilities are fixed data); a padding entry with log-probability −inf adds
        nothing.
    target : (...) integer labels, optional
        Rows whose label equals ``ignore_index`` are skipped (loss 0, zero gradient); the
        other labels must lie in [0, C).
    beta : float in [0, 1]
        0: forward KL(p_T ‖ p_S); 1: reverse KL(p_S ‖ p_T); between: the generalised JSD.
    temperature : float > 0, finite
        τ divides both (capped) logits.  No τ² factor.
    reduction : "mean", "sum" or "none"
        "mean" divides the sum by the number of non-ignored rows (N without a target; 0 with
        a zero gradient when every row is ignored).
    softcap : float > 0, optional
        Both logits are capped, s tanh(f / s), before the temperature.
    return_grad : bool
        Also return ∂loss/∂student_logits, in the student's dtype (rounded once).
    grad_row_scale : (...) array, optional
        With reduction="none" and return_grad: the gradient of Σ_i g_i L_i instead.

    Returns
    -------
    loss or (loss, grad)
        float32 (float64 for float64 students).  A row whose student maximum (or dense
        teacher maximum) is not finite gives NaN.

    Student and teacher may be dask arrays chunked by rows (the classes whole).
    """
    xp = array_module(student_logits, teacher_logits if not isinstance(teacher_logits, tuple)
                      else teacher_logits[0], target, grad_row_scale)
    S = asarray(xp, student_logits)
    T = (tuple(asarray(xp, a) for a in teacher_logits) if isinstance(teacher_logits, tuple)
         else asarray(xp, teacher_logits))
    target, grad_row_scale = asarray(xp, target), asarray(xp, grad_row_scale)
    args = distill_args(S, T, target, beta=beta, temperature=temperature,
                        ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                        return_grad=return_grad)
    _check_row_scale(args, grad_row_scale)
    if args.sparse:
        _check_sparse(xp, T[0], T[1], args)
    active = _active_rows(xp, target, args, check=not _labels_checked)
    sigma, denom = _row_scale(xp, args, active, grad_row_scale, _denominator)
    from ._distill_rows import sparse_rows

    c = args.c
    S2 = S.reshape(args.n, c)
    loss_rows = xp.empty(args.n, args.acc)
    grad = xp.empty((args.n, c), S.dtype) if args.return_grad else None
    if args.sparse:
        sparse_rows(xp, S2, T[0].reshape(args.n, args.k), T[1].reshape(args.n, args.k), args,
                    active, loss_rows, grad, sigma)
    else:
        run_distill_rows(xp, S2, T.reshape(args.n, c), args, active, loss_rows, grad, sigma)
    loss = _reduce(xp, args, loss_rows, denom)
    if not args.return_grad:
        return loss
    return loss, grad.reshape(S.shape)


@backends("X_student", "X_teacher", "target",
          dask=lambda run, arguments: _dask.linear_distillation_loss(run, **arguments))
def linear_distillation_loss(X_student, W_student, X_teacher, W_teacher, target=None, *,
                             bias_student=None, bias_teacher=None, chunk_size=None, beta=0.0,
                             temperature=1.0, ignore_index=-100, reduction="mean", softcap=None,
                             return_grad=False, input_grad=True, check_finite=True,
                             grad_row_scale=None, _denominator=None, _acc_grads=False,
                             _labels_checked=False):
    r""":func:`distillation_loss` of the student's logits X_student W_studentᵀ (+ bias) against
    the teacher's X_teacher W_teacherᵀ (+ bias), a chunk of rows at a time: neither model's
    N × C logits exist whole (two chunk buffers of chunk × C in the accumulation dtype).

    X_student (N, D_s) and W_student (C, D_s) share a dtype, as do X_teacher (N, D_t) and
    W_teacher (C, D_t); the two models may differ in width and dtype.  ``chunk_size``,
    ``input_grad`` and ``check_finite`` as in :func:`gpuce.linear_cross_entropy`; the other
    options as in :func:`distillation_loss` (a dense teacher).  With ``return_grad`` returns
    ``(loss, LinearGrads(X, W, bias))`` of the student: dX = G W_s, dW = Gᵀ X_s, db = Σ G
    (16-bit dW accumulated in float32 and rounded once).  (``_denominator``, ``_acc_grads``:
    private, for the dask form.)
    """
    xp = array_module(X_student, W_student, X_teacher, W_teacher, target, bias_student,
                      bias_teacher, grad_row_scale)
    Xs, Ws, Xt, Wt, target, bs, bt, grad_row_scale = (
        asarray(xp, a) for a in (X_student, W_student, X_teacher, W_teacher, target,
                                 bias_student, bias_teacher, grad_row_scale))
    check_finite = check_flag(check_finite, "check_finite")
    input_grad = check_flag(input_grad, "input_grad")
    dummy = xp.zeros(Xs.shape[0] if Xs.ndim else 0, np.int64)
    check_linear_args(xp, Xs, Ws, dummy, bs, 0.0, check_finite)
    check_linear_args(xp, Xt, Wt, dummy, bt, 0.0, check_finite)
    if Xt.shape[0] != Xs.shape[0] or Wt.shape[0] != Ws.shape[0]:
        raise ValueError(f"student and teacher must have the same rows and classes: X "
                         f"{tuple(Xs.shape)} / {tuple(Xt.shape)}, W {tuple(Ws.shape)} / "
                         f"{tuple(Wt.shape)}")
    chunk_size = check_chunk_size(chunk_size)
    n, d = Xs.shape
    c = Ws.shape[0]
    args = distill_args(ShapeOnly((n, c), Xs.dtype), ShapeOnly((n, c), Xt.dtype), target,
                        beta=beta, temperature=temperature, ignore_index=ignore_index,
                        reduction=reduction, softcap=softcap, return_grad=return_grad)
    _check_row_scale(args, grad_row_scale)
    active = _active_rows(xp, target, args, check=not _labels_checked)
    sigma, denom = _row_scale(xp, args, active, grad_row_scale, _denominator)
    acc = args.acc
    Ws, Wt = xp.ascontiguousarray(Ws), xp.ascontiguousarray(Wt)
    t_acc = np.dtype(np.float64) if Xt.dtype == np.float64 else np.dtype(np.float32)
    dX = dW = db = None
    if args.return_grad:
        dW = xp.zeros(Ws.shape, acc if Ws.dtype != acc else Ws.dtype)
        dX = xp.empty((n, d), acc if _acc_grads else Xs.dtype) if input_grad else None
        db = xp.zeros(c, acc) if bs is not None else None
    grads_bytes = (dW.nbytes + (dX.nbytes if dX is not None else 0)) if args.return_grad else 0
    rows = chunk_rows(xp, Xs, c, acc, chunk_size, backward=args.return_grad,
                      grads_bytes=grads_bytes)
    teacher_buf = xp.empty((min(rows, n), c), t_acc) if n else None
    loss_rows = xp.empty(n, acc)

    def row_op(s, e, f):
        ft = teacher_buf[:e - s]
        if bt is not None:
            ft[...] = bt.astype(t_acc, copy=False)
        gemm(xp, "N", "T", xp.ascontiguousarray(Xt[s:e]), Wt, ft, 1.0,
             0.0 if bt is None else 1.0)
        sig = sigma[s:e] if getattr(sigma, "ndim", 0) == 1 else sigma
        run_distill_rows(xp, f, ft, args, active[s:e], loss_rows[s:e],
                         f if args.return_grad else None, sig)

    run_chunks(xp, Xs, Ws, bs, acc, rows, row_op, dW=dW, dX=dX, db=db)
    loss = _reduce(xp, args, loss_rows, denom)
    if not args.return_grad:
        return loss
    if _acc_grads:
        return loss, LinearGrads(dX, dW, db)
    return loss, LinearGrads(dX, dW.astype(Ws.dtype, copy=False),
                             None if db is None else db.astype(Xs.dtype))
