"""A row's softmax statistics over a block of its classes, their order-fixed combine, and a
block's gradient from the combined row: the decomposition that lets the classes of a row live
in several places (dask chunks along the class axis; later ranks of a vocabulary-parallel
model) while every result equals the whole row's.

For the classes [c0, c0 + B) of row i, with v = s tanh(f / s) (v = f without a softcap), a
block reports (``block_partials``), each in the accumulation dtype:

    m    max_j v_j over the block (−inf for an empty block; NaN if a NaN is there)
    s    Σ_j exp(v_j − m̂)                 m̂ = m where finite, else 0 (the finite shift)
    t    v_k where the row's label k falls in the block, else 0
    wk   w_k where k falls in the block (1 without class weights), else 0
    a    Σ_j coef_j                      the smoothing / probability coefficients of the block
    b    Σ_j coef_j (v_j − m̂)            (terms with coef_j = 0 are 0)
    imax the global index of the block's first maximum (the predicted class's candidate)

with coef_j = (ε / C) w_j for labels and w_j p′_ij for probabilities (gpuce._rowterms).
``combine`` folds the blocks in their class order — the same arithmetic in the same order
wherever it runs, so every holder of the partials gets the same bits:

    M = max m,  M̂ its finite shift,  r = exp(m̂ − M̂)
    S = Σ r s (a block with s = 0 adds 0),  t = Σ t,  wk = Σ wk,  a = Σ a,  b = Σ (b + a (m̂ − M̂))  (a = 0 terms are 0)

and ``row_terms`` gives each row's loss (lse = M̂ + log S; gpuce._rowterms.row_loss with
wl = (1 − ε) wk and t − M̂) and the gradient's factor G; ``block_grad`` then writes a block's
gradient σ (exp(v_j − lse) G − coef_j − wl [j = k]) (times 1 − tanh²(f / s) with a softcap).
"""

from __future__ import annotations

import numpy as np

from . import _rowterms as terms

FIELDS = ("m", "s", "t", "wk", "a", "b", "imax")


def _capped(xp, xb, args):
    """(v, dcap): the block's values in the accumulation dtype and, with a softcap,
    1 − tanh²(f / s) (None without)."""
    acc = args.acc
    if not args.softcap:
        return xb.astype(acc, copy=True), None
    cap = acc.type(args.softcap)
    th = xp.tanh(xp.divide(xb, cap, dtype=acc, casting="unsafe"))
    dcap = acc.type(1) - th * th
    th *= cap
    return th, dcap


def _label_parts(xp, labels, c0, cb, args):
    """(active rows, label inside this block, the label's local index (0 elsewhere), bad
    label rows (only with check_labels=False))."""
    lbl = labels.astype(np.int64, copy=False)
    active = lbl != args.ignore_index
    bad = active & ((lbl < 0) | (lbl >= args.c))
    local = lbl - c0
    inside = active & ~bad & (local >= 0) & (local < cb)
    return active, inside, xp.where(inside, local, 0), bad


def _coefficients(xp, ops, args, y, wb, n, cb):
    """coef (n, cb) or (cb,) for the block, or None (labels without smoothing)."""
    if args.kind == "label":
        cw = terms.smoothing_coefficients(ops, wb, args.label_smoothing, args.c)
        if cw is not None and cw.shape != (cb,):  # ops.full(c, ...) is the whole row's
            cw = ops.full(cb, args.label_smoothing / args.c)
        return cw
    return terms.target_coefficients(ops, y, wb, args.label_smoothing, args.c)


def block_partials(xp, xb, c0, args, labels=None, y=None, weight=None):
    """The partial statistics (a dict of (n,) arrays, see the module docstring) of the
    logits block ``xb`` (n, cb) holding classes [c0, c0 + cb); ``labels`` (n,) global class
    indices, or ``y`` (n, cb) the block of probability targets; ``weight`` the block's class
    weights (cb,) in the accumulation dtype, or None."""
    acc = args.acc
    ops = terms.ArrayOps(xp, acc)
    n, cb = xb.shape
    zero = acc.type(0)
    with np.errstate(all="ignore"):
        v, _ = _capped(xp, xb, args)
        if cb:
            m = v.max(axis=1)
            imax = xp.argmax(v, axis=1).astype(np.int64) + c0
        else:
            m = xp.full(n, -np.inf, acc)
            imax = xp.full(n, -1, np.int64)
        ms = xp.where(xp.isfinite(m), m, zero).astype(acc)
        if args.kind == "label":
            active, inside, local, _ = _label_parts(xp, labels, c0, cb, args)
            rows = xp.arange(n)
            t = xp.where(inside, v[rows, local] if cb else zero, zero).astype(acc)
            if weight is None:
                wk = xp.where(inside, acc.type(1), zero).astype(acc)
            else:
                wk = xp.where(inside, weight[local] if cb else zero, zero).astype(acc)
        else:
            active = xp.ones(n, bool)
            t = xp.zeros(n, acc)
            wk = xp.zeros(n, acc)
        v -= ms[:, None]  # e = v − m̂
        coef = _coefficients(xp, ops, args, y, weight, n, cb)
        if coef is None:
            a = xp.zeros(n, acc)
            b = xp.zeros(n, acc)
        else:
            prod = xp.where(coef != 0, coef * v, zero)
            if coef.ndim == 1:
                a = xp.where(active, coef.sum(dtype=acc), zero).astype(acc)
                b = xp.where(active, prod.sum(axis=1), zero).astype(acc)
            else:
                a = coef.sum(axis=1).astype(acc)
                b = prod.sum(axis=1).astype(acc)
        s = xp.exp(v).sum(axis=1).astype(acc)
    return {"m": m.astype(acc), "s": s, "t": t, "wk": wk, "a": a, "b": b, "imax": imax}


def combine(xp, parts, acc):
    """The whole row's statistics from its blocks' partials, folded in the order given
    (the blocks' class order): M, M̂, S, t, wk, a, b and imax (module docstring)."""
    acc = np.dtype(acc)
    zero = acc.type(0)
    with np.errstate(all="ignore"):
        M = parts[0]["m"]
        imax = parts[0]["imax"]
        for p in parts[1:]:
            better = p["m"] > M  # strictly: the first block among equal maxima keeps it
            imax = xp.where(better, p["imax"], imax)
            M = xp.maximum(M, p["m"])  # NaN propagates
        nan_row = xp.isnan(M)
        imax = xp.where(nan_row, -1, imax)
        MS = xp.where(xp.isfinite(M), M, zero).astype(acc)
        S = xp.zeros_like(MS)
        t = xp.zeros_like(MS)
        wk = xp.zeros_like(MS)
        a = xp.zeros_like(MS)
        b = xp.zeros_like(MS)
        for p in parts:
            ms = xp.where(xp.isfinite(p["m"]), p["m"], zero).astype(acc)
            # an empty or all −inf block has s = 0 exactly: it adds 0 (never 0 · exp(−M̂) = NaN)
            S = S + xp.where(p["s"] == 0, zero, xp.exp(ms - MS) * p["s"]).astype(acc)
            t = t + p["t"]
            wk = wk + p["wk"]
            a = a + p["a"]
            b = b + xp.where(p["a"] != 0, p["b"] + p["a"] * (ms - MS), zero)
    return {"M": M, "MS": MS, "S": S, "t": t, "wk": wk, "a": a, "b": b, "imax": imax}


def row_terms(xp, comb, args, labels=None, z=None):
    """Per row from the combined statistics: ``loss`` (0 for ignored rows, NaN for bad
    ones), ``lse``, ``G`` (the gradient's factor), ``wl``, ``zt`` (z lse² of the counted
    rows), ``active`` and ``bad``; ``z`` overrides args.z_loss (the class-weighted mean's
    coefficient)."""
    acc = args.acc
    ops = terms.ArrayOps(xp, acc)
    z = args.z_loss if z is None else z
    with np.errstate(all="ignore"):
        log_s = xp.log(comb["S"])
        lse = comb["MS"] + log_s
        bad = ~xp.isfinite(comb["M"])
        if args.kind == "label":
            lbl = labels.astype(np.int64, copy=False)
            active = lbl != args.ignore_index
            bad = bad | (active & ((lbl < 0) | (lbl >= args.c)))
        else:
            active = xp.ones(lse.shape, bool)
        wl = terms.label_coefficients(ops, comb["wk"], args.label_smoothing)
        zt = terms.z_term(ops, z, lse)
        loss = terms.row_loss(ops, wl, comb["t"] - comb["MS"], log_s, comb["a"], comb["b"], zt)
        loss = xp.where(active, xp.where(bad, acc.type(np.nan), loss), acc.type(0)).astype(acc)
        G = terms.logit_grad_factor(ops, wl, comb["a"], z, lse)
        zt = xp.where(active, zt, acc.type(0)).astype(acc) if z else xp.zeros_like(lse)
    return {"loss": loss, "lse": lse.astype(acc), "G": G, "wl": wl, "zt": zt,
            "active": active, "bad": bad}


def _finish_grad(g, dcap, rows, out):
    """A gradient block's last steps: through the cap, NaN rows for bad rows, 0 for ignored
    ones; into ``out`` (rounded once to its dtype) where given."""
    with np.errstate(all="ignore"):
        if dcap is not None:
            g *= dcap
        g[rows["bad"]] = np.nan
        g[~rows["active"]] = 0
    if out is None:
        return g
    out[...] = g
    return out


def block_grad(xp, xb, c0, args, rows, scale, labels=None, y=None, weight=None, out=None):
    """The block's gradient σ (exp(v − lse) G − coef − wl [j = k]) (times 1 − tanh²(f / s)
    with a softcap), σ = ``scale`` (a number or an (n,) array of row scales), from
    :func:`row_terms`' ``rows``; ignored rows 0, bad rows NaN.  In the accumulation dtype,
    into ``out`` (rounded once to its dtype) where given."""
    acc = args.acc
    ops = terms.ArrayOps(xp, acc)
    n, cb = xb.shape
    with np.errstate(all="ignore"):
        v, dcap = _capped(xp, xb, args)
        sig = xp.asarray(scale, dtype=acc)
        sig = sig.reshape(-1, 1) if sig.ndim else sig
        v -= rows["lse"][:, None]
        xp.exp(v, out=v)
        v *= (rows["G"][:, None] * sig).astype(acc)
        coef = _coefficients(xp, ops, args, y, weight, n, cb)
        if coef is not None:
            v -= (coef * sig).astype(acc) if coef.ndim == 2 else (coef[None, :] * sig).astype(acc)
        if args.kind == "label" and cb:
            _, inside, local, _ = _label_parts(xp, labels, c0, cb, args)
            r = xp.flatnonzero(inside)
            wl = (rows["wl"] * (sig.ravel() if sig.ndim else sig)).astype(acc)
            v[r, local[r]] -= wl[r] if wl.ndim else wl
    return _finish_grad(v, dcap, rows, out)


# -- token rows: log p and entropy (gpuce.tokens) -------------------------------------------------
#
# For the tempered values u = cap(f) / τ of the block, a block reports m = max u, s = Σ exp(u − m̂),
# h = Σ exp(u − m̂) (u − m̂) (terms with exp = 0 are 0) and t = u_k where the row's token k falls
# in the block (else 0).  ``token_combine`` folds them in block order, M, M̂ and r = exp(m̂ − M̂)
# as above: S = Σ r s, b = Σ r (h + s (m̂ − M̂)) (blocks with s = 0 add 0), t = Σ t; then
# log p = (t − M̂) − log S and H = log S − b / S, and a block's gradient is
# (1/τ) (g_l [j = k] − q_j (α + g_H e_j)) with e_j = u_j − M̂, q_j = exp(e_j) / S and
# α = g_l − g_H b / S (gpuce._rowterms, "token log-probabilities and entropy").

TOKEN_FIELDS = ("m", "s", "h", "t")


def _tempered(xp, xb, args):
    """(u, dcap): the block's capped, tempered values in the accumulation dtype."""
    u, dcap = _capped(xp, xb, args)
    if args.inv_temperature != 1:
        u *= args.acc.type(args.inv_temperature)
    return u, dcap


def token_block_partials(xp, xb, c0, args, labels):
    """The token statistics m, s, h, t (a dict of (n,) accumulation-dtype arrays) of the
    logits block ``xb`` (n, cb) holding classes [c0, c0 + cb); ``labels`` the (n,) global
    tokens, checked by the caller."""
    acc = args.acc
    n, cb = xb.shape
    zero = acc.type(0)
    with np.errstate(all="ignore"):
        u, _ = _tempered(xp, xb, args)
        m = u.max(axis=1) if cb else xp.full(n, -np.inf, acc)
        ms = xp.where(xp.isfinite(m), m, zero).astype(acc)
        _, inside, local, _ = _label_parts(xp, labels, c0, cb, args)
        t = xp.where(inside, u[xp.arange(n), local] if cb else zero, zero).astype(acc)
        u -= ms[:, None]
        p = xp.exp(u)
        s = p.sum(axis=1).astype(acc)
        h = xp.where(p > 0, p * u, zero).sum(axis=1).astype(acc)
    return {"m": m.astype(acc), "s": s, "h": h, "t": t}


def token_combine(xp, parts, acc):
    """The whole row's M, M̂, S, b and t from its blocks' token partials, in block order."""
    acc = np.dtype(acc)
    zero = acc.type(0)
    with np.errstate(all="ignore"):
        M = parts[0]["m"]
        for p in parts[1:]:
            M = xp.maximum(M, p["m"])  # NaN propagates
        MS = xp.where(xp.isfinite(M), M, zero).astype(acc)
        S = xp.zeros_like(MS)
        b = xp.zeros_like(MS)
        t = xp.zeros_like(MS)
        for p in parts:
            ms = xp.where(xp.isfinite(p["m"]), p["m"], zero).astype(acc)
            d = ms - MS
            r = xp.exp(d)
            empty = p["s"] == 0  # an empty or all −inf block adds 0
            S = S + xp.where(empty, zero, r * p["s"]).astype(acc)
            b = b + xp.where(empty, zero, r * (p["h"] + p["s"] * d)).astype(acc)
            t = t + p["t"]
    return {"M": M, "MS": MS, "S": S, "b": b, "t": t}


def token_row_terms(xp, comb, args, labels):
    """Per row: ``logp`` and ``entropy`` (0 for ignored rows, NaN where the row's maximum is
    not finite), ``log_s``, ``active`` and ``bad``."""
    acc = args.acc
    ops = terms.ArrayOps(xp, acc)
    with np.errstate(all="ignore"):
        log_s = xp.log(comb["S"])
        logp, ent = terms.token_terms(ops, comb["t"] - comb["MS"], log_s, comb["b"], comb["S"])
        active = labels.astype(np.int64, copy=False) != args.ignore_index
        bad = ~xp.isfinite(comb["M"])
        nan, zero = acc.type(np.nan), acc.type(0)
        logp = xp.where(active, xp.where(bad, nan, logp), zero).astype(acc)
        ent = xp.where(active, xp.where(bad, nan, ent), zero).astype(acc)
    return {"logp": logp, "entropy": ent, "log_s": log_s, "MS": comb["MS"], "S": comb["S"],
            "b": comb["b"], "active": active, "bad": bad}


def token_block_grad(xp, xb, c0, args, rows, labels, g_logp=None, g_entropy=None, out=None):
    """The block's gradient of Σ g_l log p + g_H H from :func:`token_row_terms`' ``rows``
    (g_logp, g_entropy: (n,) accumulation-dtype arrays, None for 0); ignored rows 0, bad rows
    NaN; into ``out`` (rounded once to its dtype) where given."""
    acc = args.acc
    ops = terms.ArrayOps(xp, acc)
    n, cb = xb.shape
    inv_tau = acc.type(args.inv_temperature)
    with np.errstate(all="ignore"):
        e, dcap = _tempered(xp, xb, args)
        e -= rows["MS"][:, None]
        q = xp.exp(e)
        q *= (inv_tau / rows["S"]).astype(acc)[:, None]  # q_j / τ
        alpha = xp.asarray(terms.token_grad_alpha(ops, g_logp, g_entropy, rows["b"], rows["S"]),
                           dtype=acc).reshape(-1, 1)
        if g_entropy is not None:
            e *= g_entropy[:, None]
            e += alpha
        else:
            e[...] = alpha
        xp.multiply(q, e, out=e)
        e[q == 0] = 0
        xp.negative(e, out=e)
        if g_logp is not None and cb:
            _, inside, local, _ = _label_parts(xp, labels, c0, cb, args)
            r = xp.flatnonzero(inside)
            e[r, local[r]] += (inv_tau * g_logp[r]).astype(acc)
    return _finish_grad(e, dcap, rows, out)
