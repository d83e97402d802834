"""A row's cross-entropy terms, stated once on the host for NumPy, CuPy and torch arrays.

Row i has (capped) logits v (``v = s tanh(f / s)`` with a softcap s, else the logits f),
m = max_j v_j, s = Σ_j exp(v_j − m), lse = m + log s and log q_j = v_j − lse.  With class
weights w (all 1 without), label smoothing ε over C classes and z-loss z, the row's loss is

    L = wl (lse − v_k) + Σ_j coef_j (lse − v_j) + z lse²

with, for a class index k,    wl = (1 − ε) w_k   and coef_j = (ε / C) w_j,
and for probabilities y,      wl = 0             and coef_j = w_j p′_j,  p′ = (1 − ε) y + ε / C.

Written with the shifted values t = v_k − m, a = Σ_j coef_j and b = Σ_j coef_j (v_j − m)
(lse − v_j = log s − (v_j − m)):  L = wl (log s − t) + (a log s − b) + z lse², each of the
first two terms 0 where its coefficient is 0 (so that an infinite logit with a zero
coefficient adds nothing).  The gradients, for a row scaled by σ (the incoming gradient, or
1/denominator for "mean"):

    ∂L/∂v_j = σ (q_j G − coef_j − wl [j = k]),  G = wl + a + 2 z lse       (chained through
                                                       the cap by 1 − tanh²(f / s))
    ∂L/∂y_j = (1 − ε) w_j A_j,   ∂L/∂w_j = Σ_i p′_ij A_ij,   A = −log q · σ  (probabilities)

Each function takes an ``ops`` adapter (:class:`ArrayOps` for NumPy and CuPy; gpuce.torch has
one for tensors): ``ops.xp`` the array namespace, ``ops.scalar(v)`` v rounded to the
accumulation dtype, ``ops.widen(a)`` an array in it, ``ops.full(n, v)``, ``ops.scaled(a, v,
out=None)`` (a widened, times scalar(v), optionally into ``out``).  Every product and sum is
formed in the accumulation dtype (float32 for 16-bit inputs, float64 for float64), every
scalar rounded to it first: no result depends on a library's type promotion.  Results stay in
the accumulation dtype; callers round 16-bit results once.  Used by the NumPy path
(:mod:`gpuce._sce_numpy`) and gpuce.torch's backward of probability targets and class weights.
"""

from __future__ import annotations

import numpy as np


class ArrayOps:
    """The ``ops`` adapter for NumPy and CuPy arrays (``xp`` the module) accumulating in
    ``acc`` (a NumPy dtype)."""

    def __init__(self, xp, acc):
        self.xp = xp
        self.acc = np.dtype(acc)

    def scalar(self, v):
        return self.acc.type(v)

    def widen(self, a):
        return a.astype(self.acc, copy=False)

    def full(self, n, v):
        return self.xp.full(n, self.scalar(v), self.acc)

    def scaled(self, a, v, out=None):
        # dtype=acc: a 16-bit a is widened before the product (never multiplied in its own
        # dtype, whatever the promotion rules of NumPy or ml_dtypes say)
        return self.xp.multiply(a, self.scalar(v), out=out, dtype=self.acc, casting="unsafe")


def smoothed_target(ops, y, eps, c, out=None):
    """p′ = (1 − ε) y + ε / C for probability targets y (..., C), in the accumulation dtype
    (into ``out`` where given)."""
    p = ops.scaled(y, 1.0 - eps, out=out)
    p += ops.scalar(eps / c)
    return p


def target_coefficients(ops, y, w, eps, c, out=None):
    """coef = w ⊙ p′: the probability target's coefficients (w None: p′); ``w`` already in
    the accumulation dtype."""
    coef = smoothed_target(ops, y, eps, c, out=out)
    if w is not None:
        coef *= w
    return coef


def label_coefficients(ops, w_k, eps):
    """wl = (1 − ε) w_k: each row's label-term coefficient from its label's weight w_k (an
    array in the accumulation dtype)."""
    return ops.scalar(1.0 - eps) * w_k


def smoothing_coefficients(ops, w, eps, c):
    """coef = (ε / C) w for class-index targets (w None: ε / C for each class), or None
    without smoothing."""
    if eps == 0.0:
        return None
    return ops.full(c, eps / c) if w is None else ops.scalar(eps / c) * w


def z_term(ops, z, lse):
    """z lse² per row (a 0 scalar without z-loss)."""
    return ops.scalar(z) * lse * lse if z != 0 else ops.scalar(0)


def row_loss(ops, wl, t, log_s, a, b, zt):
    """L = wl (log s − t) + (a log s − b) + zt per row, each of the first two terms 0 where
    its coefficient (wl, a) is 0."""
    xp, zero = ops.xp, ops.scalar(0)
    lab = xp.where(wl != 0, wl * (log_s - t), zero)
    smooth = xp.where(a != 0, a * log_s - b, zero)
    return lab + smooth + zt


def logit_grad_factor(ops, wl, a, z, lse):
    """G = wl + a + 2 z lse per row: ∂L/∂v_j = q_j G − coef_j − wl [j = k]."""
    return wl + a + ops.scalar(2.0 * z) * lse


def soft_target_grads(ops, a, y, w, eps, target_grad, weight_grad):
    """With A = −log q · σ (``a``, (..., C), the accumulation dtype): ∂/∂y = (1 − ε) w A (w
    None: (1 − ε) A) with ``target_grad`` and ∂/∂w_c = Σ_i p′_ic A_ic (over every leading
    axis) with ``weight_grad``; each None where not asked for."""
    d_target = d_weight = None
    if target_grad:
        d_target = a * ops.scalar(1.0 - eps)
        if w is not None:
            d_target = d_target * ops.widen(w)
    if weight_grad:
        c = a.shape[-1]
        d_weight = (smoothed_target(ops, y, eps, c) * a).reshape(-1, c).sum(0)
    return d_target, d_weight


# -- token log-probabilities and entropy ---------------------------------------------------------
#
# Row i at temperature τ reads u = v / τ (v the capped logits); with m = max u, e_j = u_j − m,
# s = Σ_j exp(e_j), log s and b = Σ_j exp(e_j) e_j (each term 0 where exp(e_j) = 0):
#
#     log p_i = u_k − lse = e_k − log s,        H_i = −Σ_j q_j log q_j = log s − b / s,
#
# and for incoming row gradients g_l (of log p) and g_H (of H), with log q_j = e_j − log s,
#
#     ∂/∂v_j = (1/τ) (g_l ([j = k] − q_j) − g_H q_j (log q_j + H))
#            = (1/τ) (g_l [j = k] − q_j (α + g_H e_j)),      α = g_l − g_H b / s,
#
# q_j (α + g_H e_j) taken as 0 where q_j = 0 (an entry at −inf).

def token_terms(ops, t, log_s, b, s):
    """(log p, H) per row from the shifted label value t = e_k, log s, b and s."""
    return t - log_s, log_s - b / s


def token_grad_alpha(ops, g_logp, g_entropy, b, s):
    """α = g_l − g_H b / s per row (g_l, g_H arrays or None for 0)."""
    alpha = ops.scalar(0) if g_logp is None else g_logp
    if g_entropy is not None:
        alpha = alpha - g_entropy * (b / s)
    return alpha
