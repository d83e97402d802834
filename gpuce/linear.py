"""The seed's linear softmax classifier: scores f = X Wᵀ + b, total loss and its gradients.

``linear_cross_entropy`` computes the logits with one GEMM, runs the softmax
cross-entropy kernels in place on them (the gradient G = ∂loss/∂f overwrites the
logits buffer, so no second N x C array exists), then forms

    dW = Gᵀ X + λ W      (one GEMM; on the GPU cuBLAS folds + λW in through beta)
    dX = G W             (one GEMM, skipped with input_grad=False)
    db = Σ_i G_i

On the GPU the matrix products go through cuBLAS and ‖W‖² is one ReductionKernel.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _validation as V
from ._backend import array_module, asarray
from .sce import softmax_cross_entropy


class LinearGrads(NamedTuple):
    """Gradients of the returned loss: ``X`` (N, D) or None, ``W`` (C, D), ``bias`` (C,) or None."""

    X: object
    W: object
    bias: object


def check_linear_args(xp, X, W, y, bias, reg, check_finite=True):
    """Validation for the linear model (shapes, dtypes, finiteness) before any work."""
    for a, name in ((X, "X"), (W, "W")):
        V.check_float(a, name)
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if X.dtype != W.dtype:
        raise TypeError(f"X and W must have the same dtype, got {X.dtype} and {W.dtype}")
    n, d = X.shape
    c, dw = W.shape
    if d != dw:
        raise ValueError(f"X has {d} features but W has {dw} (W must be (C, D) = (classes, features))")
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} rows but X has {n}")
    if y.ndim == 2 and y.shape[1] != c:
        raise ValueError(f"probability targets y must have shape ({n}, {c}), got {y.shape}")
    if bias is not None:
        V.check_float(bias, "bias")
        if bias.shape != (c,):
            raise ValueError(f"bias must have shape ({c},), got {bias.shape}")
    reg = V._real(reg, "reg")
    if not (np.isfinite(reg) and reg >= 0):
        raise ValueError(f"reg must be a finite number >= 0, got {reg}")
    if check_finite:
        for a, name in ((X, "X"), (W, "W"), (bias, "bias")):
            if a is not None and a.size and not bool(xp.isfinite(a).all()):
                raise ValueError(f"{name} contains NaN or infinity")
    return reg


def sum_squares(xp, W):
    """Σ W² in the accumulation dtype (a ReductionKernel on the GPU)."""
    acc = V.acc_dtype(W.dtype)
    if xp is np:
        w = W.astype(acc, copy=False).ravel()
        return acc.type(np.dot(w, w))
    from ._cupy_kernels import get_kernel

    out = xp.empty((), acc)  # the output dtype placeholder is not bound by the input
    get_kernel("gpuce_sumsq", T=W.dtype.name, A=acc.name)(W, out, axis=None)
    return out


def _logits(xp, X, W, bias):
    n, c = X.shape[0], W.shape[0]
    f = xp.empty((n, c), dtype=X.dtype)
    if xp is not np and X.dtype != np.float16 and _gemm_ready(X, W, f):
        from cupy import cublas  # lazy: loads cuBLAS

        if bias is not None:
            f[...] = bias  # added by the GEMM through beta
        cublas.gemm("N", "T", X, W, out=f, alpha=1.0, beta=0.0 if bias is None else 1.0)
    else:
        xp.matmul(X, W.T, out=f)
        if bias is not None:
            f += bias
    return f


def _grad_w(xp, G, X, W, reg):
    """dW = Gᵀ X + reg·W, with + reg·W folded into the GEMM's beta on the GPU."""
    if xp is not np and X.dtype != np.float16 and _gemm_ready(G, X, W):
        from cupy import cublas

        dW = W * W.dtype.type(1) if reg else xp.empty_like(W)  # a C-contiguous copy for beta
        cublas.gemm("T", "N", G, X, out=dW, alpha=1.0, beta=float(reg))
        return dW
    dW = xp.matmul(G.T, X)
    if reg:
        dW += W.dtype.type(reg) * W
    return dW


def _grad_b(xp, G):
    """db = 1ᵀ G.  On CuPy (float32/64) a matrix-vector product through cuBLAS: CuPy's
    column reduction G.sum(axis=0) runs one block per column, so with few classes (C = 100)
    it has too few blocks, each reading a strided column."""
    if xp is not np and G.dtype != np.float16:
        return xp.matmul(xp.ones(G.shape[0], G.dtype), G)
    return G.sum(axis=0)


def _gemm_ready(*arrays):
    return all(a.flags.c_contiguous for a in arrays)


def linear_cross_entropy(X, W, y, *, bias=None, reg=0.0, reduction="mean", ignore_index=-100,
                         weight=None, label_smoothing=0.0, z_loss=0.0, return_grad=False,
                         input_grad=True, check_finite=True):
    r"""Loss of the linear softmax classifier f = X Wᵀ (+ bias) with L2 penalty on W.

    ``reduction="sum"`` with ``reg=λ`` is the seed's total loss::

        L_total = Σ_i L_i + λ/2 ‖W‖²,      ∂L_total/∂W = (Ŷ − Y)ᵀ X + λ W

    ``reduction="mean"`` gives ``(1/D) Σ_i L_i + λ/2 ‖W‖²`` (D the mean's denominator of
    :func:`softmax_cross_entropy`: the non-ignored weight sum for labels, N for
    probabilities).  ``reduction="none"`` returns the per-sample L_i (no penalty);
    its gradients are those of ``Σ_i L_i + λ/2 ‖W‖²``.  The bias is never penalised.

    Parameters
    ----------
    X : (N, D) float array, NumPy or CuPy
    W : (C, D) float array of X's dtype (like torch's ``Linear.weight``)
    y : (N,) integer labels or (N, C) probabilities
    bias : (C,) array, optional
    reg : float >= 0
        λ, the L2 penalty on W.
    reduction, ignore_index, weight, label_smoothing, z_loss
        As in :func:`softmax_cross_entropy`.
    return_grad : bool
        Also return :class:`LinearGrads` ``(X, W, bias)`` of the returned loss.
    input_grad : bool
        Compute dX (one GEMM); a trainer that needs only dW passes False (grads.X is None).
    check_finite : bool
        Reject non-finite X, W, bias (one pass and one sync each); trainers that
        validated their data once pass False.

    Returns
    -------
    loss, or (loss, grads)
    """
    xp = array_module(X, W, y, bias, weight)
    X, W, y, bias, weight = (asarray(xp, v) for v in (X, W, y, bias, weight))
    reg = check_linear_args(xp, X, W, y, bias, reg, check_finite)
    f = _logits(xp, X, W, bias)
    out = softmax_cross_entropy(f, y, reduction=reduction, ignore_index=ignore_index, weight=weight,
                                label_smoothing=label_smoothing, z_loss=z_loss,
                                return_grad=return_grad, inplace=return_grad)
    loss, G = out if return_grad else (out, None)
    if reg and reduction != "none":
        loss = loss + loss.dtype.type(0.5 * reg) * sum_squares(xp, W).astype(loss.dtype)
    if not return_grad:
        return loss
    dW = _grad_w(xp, G, X, W, reg)
    dX = xp.matmul(G, W) if input_grad else None
    db = _grad_b(xp, G) if bias is not None else None
    return loss, LinearGrads(dX, dW, db)
