"""Distillation losses of (N, C) student and teacher logits, a block of rows at a time: the
NumPy backend (the tests' oracle) and the CuPy rows the fused distillation kernels do not take
(the portable path, the generalised JSD, a sparse teacher, and what
:func:`gpuce._rows.distill_route` leaves to the array rows), one array-generic implementation.

Per row, in the accumulation dtype, with u = cap(S) / τ and w = cap(T) / τ (cap(f) =
s tanh(f / s) with a softcap, else f), log p_S = u − lse(u), log p_T = w − lse(w):

    β = 0      L = KL(p_T ‖ p_S) = Σ_j p_T,j (log p_T,j − log p_S,j)       ∂L/∂u = p_S − p_T
    β = 1      L = KL(p_S ‖ p_T) = Σ_j p_S,j (log p_S,j − log p_T,j)       ∂L/∂u = p_S ⊙ (d − L),
                                                                         d = log p_S − log p_T
    0 < β < 1  M = β p_T + (1 − β) p_S   (log M = logaddexp(log β + log p_T, log(1 − β) + log p_S))
               L = β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M)                   ∂L/∂u = p_S ⊙ (g − Σ p_S g),
                                                                         g = (1 − β)(log p_S − log M)

(terms whose probability is 0 are 0), and ∂L/∂S = (1/τ) ∂L/∂u, times 1 − tanh²(S / s) with a
softcap.  A sparse teacher (top-k indices and log-probabilities, as given: no renormalisation)
takes β = 0 over its support: L = Σ_{j ∈ top-k} p_T,j (log p_T,j − log p_S,j), ∂L/∂u_j =
P p_S,j − p_T,j [j ∈ top-k] with P = Σ_{top-k} p_T (the mass the teacher gives its support).
Rows where the student's or a dense teacher's maximum is not finite give NaN.
"""

from __future__ import annotations

import math

import numpy as np

NUMPY_BLOCK_ELEMENTS = 1 << 17
CUPY_BLOCK_ELEMENTS = 1 << 23


def _prepared(xp, f, args, grad):
    """(log p of cap(f) / τ, p, row max finite?, dcap or None) in the accumulation dtype."""
    acc = args.acc
    dcap = None
    if args.softcap:
        cap = acc.type(args.softcap)
        u = xp.tanh(xp.divide(f, cap, dtype=acc, casting="unsafe"))
        if grad:
            dcap = acc.type(1) - u * u
        u *= cap
    else:
        u = f.astype(acc, copy=True)
    if args.temperature != 1.0:
        u *= acc.type(1.0 / args.temperature)
    m = u.max(axis=1)
    finite = xp.isfinite(m)
    u -= xp.where(finite, m, acc.type(0)).astype(acc)[:, None]
    p = xp.exp(u)
    s = p.sum(axis=1)
    u -= xp.log(s)[:, None]  # log p
    p /= s[:, None]
    return u, p, finite, dcap


def _plogp_diff(xp, p, a, b, zero):
    """Σ_j p_j (a_j − b_j) per row, terms with p_j = 0 taken as 0."""
    return xp.where(p > 0, p * (a - b), zero).sum(axis=1)


def dense_rows(xp, S, T, args, active, loss_out, grad_out=None, row_scale=None):
    """Loss per row into ``loss_out`` and, with ``grad_out``, ∂(Σ σ_i L_i)/∂S (σ =
    ``row_scale``, an (N,) accumulation-dtype array or a number) into it."""
    n, c = S.shape
    acc = args.acc
    zero = acc.type(0)
    beta = args.beta
    grad = grad_out is not None
    per = NUMPY_BLOCK_ELEMENTS if xp is np else CUPY_BLOCK_ELEMENTS
    r = max(1, min(n, per // max(c, 1)))
    with np.errstate(all="ignore"):
        for r0 in range(0, n, r):
            r1 = min(n, r0 + r)
            lq, q, fs, dcap = _prepared(xp, S[r0:r1], args, grad)
            lp, p, ft, _ = _prepared(xp, T[r0:r1], args, False)
            bad = ~(fs & ft)
            if beta == 0.0:
                loss = _plogp_diff(xp, p, lp, lq, zero)
                g = q - p if grad else None
            elif beta == 1.0:
                loss = _plogp_diff(xp, q, lq, lp, zero)
                if grad:
                    g = xp.where(q > 0, q * ((lq - lp) - loss[:, None]), zero)
            else:
                lm = xp.logaddexp(lp + acc.type(math.log(beta)), lq + acc.type(math.log1p(-beta)))
                loss = (acc.type(beta) * _plogp_diff(xp, p, lp, lm, zero)
                        + acc.type(1 - beta) * _plogp_diff(xp, q, lq, lm, zero))
                if grad:
                    gj = xp.where(q > 0, acc.type(1 - beta) * (lq - lm), zero)
                    g = q * (gj - (q * gj).sum(axis=1)[:, None])
            act = active[r0:r1]
            loss_out[r0:r1] = xp.where(act, xp.where(bad, acc.type(np.nan), loss), zero)
            if grad:
                _finish_grad(xp, g, dcap, args, row_scale, r0, r1, bad, act, grad_out)


def sparse_rows(xp, S, idx, logp_t, args, active, loss_out, grad_out=None, row_scale=None):
    """The sparse (top-k) teacher's forward KL over its support: ``idx`` (N, k) class indices
    (distinct in a row, checked by the caller), ``logp_t`` (N, k) their log-probabilities."""
    n, c = S.shape
    acc = args.acc
    zero = acc.type(0)
    grad = grad_out is not None
    per = NUMPY_BLOCK_ELEMENTS if xp is np else CUPY_BLOCK_ELEMENTS
    r = max(1, min(n, per // max(c, 1)))
    with np.errstate(all="ignore"):
        for r0 in range(0, n, r):
            r1 = min(n, r0 + r)
            lq, q, fs, dcap = _prepared(xp, S[r0:r1], args, grad)
            ii = idx[r0:r1].astype(np.int64, copy=False)
            lp = logp_t[r0:r1].astype(acc, copy=False)
            p = xp.exp(lp)
            lq_k = xp.take_along_axis(lq, ii, axis=1)
            loss = _plogp_diff(xp, p, lp, lq_k, zero)
            bad = ~fs | xp.isnan(lp).any(axis=1)
            act = active[r0:r1]
            loss_out[r0:r1] = xp.where(act, xp.where(bad, acc.type(np.nan), loss), zero)
            if grad:
                mass = p.sum(axis=1)
                g = q * mass[:, None]
                rows = xp.broadcast_to(xp.arange(r1 - r0)[:, None], ii.shape)
                # distinct indices in a row: a plain fancy-index subtraction is exact
                g[rows, ii] -= p
                _finish_grad(xp, g, dcap, args, row_scale, r0, r1, bad, act, grad_out)


def _finish_grad(xp, g, dcap, args, row_scale, r0, r1, bad, act, grad_out):
    acc = args.acc
    sig = row_scale[r0:r1, None] if getattr(row_scale, "ndim", 0) == 1 else row_scale
    g *= (xp.asarray(sig, dtype=acc) * acc.type(1.0 / args.temperature)).astype(acc)
    if dcap is not None:
        g *= dcap
    g[bad] = acc.type(np.nan)
    g[~act] = 0
    grad_out[r0:r1] = g  # rounded once to the output's dtype
