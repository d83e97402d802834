"""Token log-probabilities and entropy of (N, C) logits, a block of rows at a time: the NumPy
backend (the tests' oracle) and the CuPy rows the fused token kernels do not take (the portable
path, and what :func:`gpuce._rows.token_route` leaves to the array rows), one array-generic
implementation.

Per block of rows, in the accumulation dtype (float32 for 16-bit logits, float64 for float64),
in one scratch buffer the size of the block (or straight in the gradient output when it has
the accumulation dtype): the capped, tempered values u = cap(f) / τ, the row maximum m, the
shifted values e = u − m, exp(e) with its sums s and b = Σ exp(e) e, then log p, H and, when
asked, the gradient (:mod:`gpuce._rowterms`, "token log-probabilities and entropy", states the
formulas).  Rows whose maximum is not finite (a NaN, a +inf, every entry −inf) give NaN;
ignored rows (label == ignore_index) give 0 and a 0 gradient row.
"""

from __future__ import annotations

import numpy as np

from . import _rowterms as terms

NUMPY_BLOCK_ELEMENTS = 1 << 18
CUPY_BLOCK_ELEMENTS = 1 << 24


def token_rows(xp, x2, labels, args, logp_out, entropy_out=None, grad_out=None,
               g_logp=None, g_entropy=None):
    """Write each row's log p (and H) into ``logp_out`` (``entropy_out``), (N,) arrays of the
    accumulation dtype, and with ``grad_out`` ((N, C), the logits' dtype or the accumulation
    dtype; it may be ``x2`` itself) the gradient of Σ_i g_l,i log p_i + g_H,i H_i (``g_logp``,
    ``g_entropy``: (N,) accumulation-dtype arrays, None for 0).  ``labels`` (N,) integers, in
    [0, C) or ignore_index (checked by the caller)."""
    n, c = x2.shape
    if n == 0:
        return
    acc = args.acc
    ops = terms.ArrayOps(xp, acc)
    lbl = labels.astype(np.int64, copy=False)
    active = lbl != args.ignore_index
    safe = xp.where(active, lbl, 0)
    cap = acc.type(args.softcap)
    inv_tau = acc.type(args.inv_temperature)
    grad = grad_out is not None
    direct = grad and grad_out.dtype == acc
    per_block = NUMPY_BLOCK_ELEMENTS if xp is np else CUPY_BLOCK_ELEMENTS
    r = max(1, min(n, per_block // max(c, 1)))
    scratch = {}

    def buf(name, k):
        if name not in scratch:
            scratch[name] = xp.empty((r, c), acc)
        return scratch[name][:k]

    with np.errstate(all="ignore"):
        for r0 in range(0, n, r):
            r1 = min(n, r0 + r)
            k = r1 - r0
            xc = x2[r0:r1]
            e = grad_out[r0:r1] if direct else buf("e", k)
            if cap:
                xp.divide(xc, cap, out=e, dtype=acc, casting="unsafe")  # xc may alias e
                xp.tanh(e, out=e)
                if grad:
                    dcap = buf("dcap", k)
                    xp.multiply(e, e, out=dcap)
                    xp.subtract(acc.type(1), dcap, out=dcap)
                e *= cap
            elif e is not xc:
                e[...] = xc  # widened to the accumulation dtype (exact)
            if inv_tau != 1:
                e *= inv_tau
            m = e.max(axis=1)
            finite = xp.isfinite(m)
            e -= xp.where(finite, m, acc.type(0)).astype(acc)[:, None]
            rows = xp.arange(k)
            lab = safe[r0:r1]
            t = e[rows, lab]
            p = buf("p", k)
            xp.exp(e, out=p)
            s = p.sum(axis=1)
            pe = xp.where(p > 0, p * e, acc.type(0))  # exp(e) e, 0 at e = −inf
            b = pe.sum(axis=1)
            del pe
            log_s = xp.log(s)
            logp, ent = terms.token_terms(ops, t, log_s, b, s)
            act = active[r0:r1]
            bad = ~finite
            nan = acc.type(np.nan)
            zero = acc.type(0)
            logp_out[r0:r1] = xp.where(act, xp.where(bad, nan, logp), zero)
            if entropy_out is not None:
                entropy_out[r0:r1] = xp.where(act, xp.where(bad, nan, ent), zero)
            if not grad:
                continue
            gl = None if g_logp is None else g_logp[r0:r1]
            gh = None if g_entropy is None else g_entropy[r0:r1]
            alpha = terms.token_grad_alpha(ops, gl, gh, b, s)
            # q_j (α + g_H e_j) / τ, 0 where q_j = 0, into e; then the label term
            alpha = xp.asarray(alpha, dtype=acc).reshape(-1, 1)  # an array or the scalar 0
            if gh is not None:
                e *= gh[:, None]
                e += alpha
            else:
                e[...] = alpha
            p *= (inv_tau / s).astype(acc)[:, None]
            xp.multiply(p, e, out=e)
            e[p == 0] = 0
            xp.negative(e, out=e)
            if gl is not None:
                e[rows, lab] += inv_tau * gl
            if cap:
                e *= dcap
            e[bad] = nan
            e[~act] = 0
            if not direct:
                grad_out[r0:r1] = e
