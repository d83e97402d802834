"""Vocabulary-parallel softmax cross-entropy on arrays: a holder of a contiguous block of every
row's classes (one rank of a tensor-parallel LM head) computes its rows' partial statistics
(:mod:`gpuce._partials`), packs them into one (N, 7) float64 array for a single exchange (an
all-gather: 56 bytes a row from each holder), and every holder then combines the gathered
partials in block order: the same arithmetic on the same data, so the loss has the same bits
everywhere.  The gradient of its own block follows from the combined rows without another
exchange.  The exchange itself is the caller's (gpuce.torch runs it through
torch.distributed); this module only packs, combines and differentiates.

For the linear head (X replicated, W split by classes) the same is done a chunk of rows at a
time on the chunk driver (:mod:`gpuce._chunks`): the forward keeps only the partials (N x 7),
the backward forms each chunk's logits again, its gradient block from the combined rows,
dW_local += Gᵀ X and this holder's share of dX = G W_local (the caller sums the shares over
the holders).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import _partials as partials
from ._chunks import chunk_rows, run_chunks
from ._rows import weighted_z_loss

PACKED = ("m", "s", "t", "wk", "a", "b", "imax")
PACKED_BYTES_PER_ROW = 8 * len(PACKED)


def pack(xp, part):
    """One holder's partials as an (N, 7) float64 array (every field exact in float64: the
    accumulation dtype is float32 or float64, imax < 2^53)."""
    return xp.stack([part[k].astype(np.float64) for k in PACKED], axis=1)


def unpack(xp, packed, acc):
    """The partials of each holder from the gathered (H, N, 7) array, in holder order."""
    out = []
    for h in range(packed.shape[0]):
        p = {k: packed[h, :, i].astype(acc) for i, k in enumerate(PACKED[:-1])}
        p["imax"] = packed[h, :, len(PACKED) - 1].astype(np.int64)
        out.append(p)
    return out


def local_partials(xp, x2, c0, args, target=None, weight=None):
    """The packed partials of this holder's logits block ``x2`` (N, C_local), classes
    [c0, c0 + C_local) of ``args.c``; ``target`` the (N,) global labels or this holder's
    (N, C_local) block of probabilities, ``weight`` its block of class weights."""
    label = args.kind == "label"
    w = None if weight is None else weight.astype(args.acc, copy=False)
    part = partials.block_partials(xp, x2, c0, args, labels=target if label else None,
                                   y=None if label else target, weight=w)
    return pack(xp, part)


def combine_rows(xp, gathered, args, target=None, weighted=False):
    """Every row's combined statistics and loss terms from the gathered (H, N, 7) partials,
    with the reduction's pieces: a dict with ``rows`` (gpuce._partials.row_terms, z-loss
    included with the whole call's coefficient), ``comb``, ``loss`` (per row for "none",
    else the reduced 0-d value in the accumulation dtype), ``scale`` (the gradient's row
    scale for "sum"/"mean"), ``z_total``, ``accuracy`` and ``predicted``.  ``weighted``: the
    call has class weights (the class-weighted mean's z-loss coefficient)."""
    acc = args.acc
    comb = partials.combine(xp, unpack(xp, gathered, acc), acc)
    label = args.kind == "label"
    z = args.z_loss
    lbl = None
    if label:
        lbl = target.astype(np.int64, copy=False)
        in_range = (lbl != args.ignore_index) & (lbl >= 0) & (lbl < args.c)
        denom = float(xp.where(in_range, comb["wk"], 0).sum(dtype=np.float64))
        count = float(in_range.sum())
    else:
        denom = count = float(args.n)
    if args.reduction == "mean" and z and weighted and label:
        z = weighted_z_loss(z, denom, count)
    rows = partials.row_terms(xp, comb, args, labels=lbl, z=z)
    scale = args.mean_scale(denom)
    if args.reduction == "none":
        loss = rows["loss"]
        z_total = rows["zt"]
    else:
        loss = xp.asarray(float(rows["loss"].sum(dtype=np.float64)) * scale, dtype=acc)
        z_total = xp.asarray(float(rows["zt"].sum(dtype=np.float64)) * scale, dtype=acc)
    accuracy = None
    if label:
        ok = xp.isfinite(comb["M"]) & in_range & (comb["t"] == comb["M"])
        if args.reduction == "none":
            accuracy = xp.where(rows["active"], ok.astype(acc), acc.type(np.nan)).astype(acc)
        else:
            counted = int(rows["active"].sum())
            accuracy = xp.asarray(float(ok.sum()) / counted if counted else np.nan, dtype=acc)
    return {"rows": rows, "comb": comb, "loss": loss, "scale": scale, "z_total": z_total,
            "accuracy": accuracy, "predicted": comb["imax"], "z": z}


def local_grad(xp, x2, c0, args, rows, row_scale, target=None, weight=None, out=None):
    """This holder's gradient block from the combined ``rows``: σ_i (q_ij G_i − coef_ij −
    wl_i [j = k_i]) with σ = ``row_scale`` (a number or (N,) array), into ``out`` (rounded
    once to its dtype) where given."""
    label = args.kind == "label"
    w = None if weight is None else weight.astype(args.acc, copy=False)
    return partials.block_grad(xp, x2, c0, args, rows, row_scale,
                               labels=target if label else None, y=None if label else target,
                               weight=w, out=out)


# -- the linear head split by classes -------------------------------------------------------------

def _linear_partials(xp, X, W, bias, args, chunk_size, width, block):
    """(N, width) float64 partials of the logits X W_localᵀ (+ b_local), a chunk of rows at a
    time: ``block(f, chunk_args, s, e)`` packs rows [s, e) from their logits f."""
    n = X.shape[0]
    out = xp.empty((n, width), np.float64)
    rows = chunk_rows(xp, X, W.shape[0], args.acc, chunk_size, backward=False,
                      grads_bytes=W.nbytes + X.nbytes)

    def row_op(s, e, f):
        out[s:e] = block(f, replace(args, n=e - s, lead_shape=(e - s,)), s, e)

    run_chunks(xp, X, W, bias, args.acc, rows, row_op)
    return out


def _linear_grads(xp, X, W, bias, args, chunk_size, input_grad, block):
    """(dX share, dW_local, db_local) from the combined rows: each chunk's logits f formed
    again, ``block(f, chunk_args, s, e)`` writes its gradient block over f, then the driver's
    GEMMs.  The dX share is G W_local: the caller sums it over the holders."""
    n, d = X.shape
    acc = args.acc
    dW = xp.zeros(W.shape, acc)
    dX = xp.empty((n, d), acc) if input_grad else None
    db = xp.zeros(W.shape[0], acc) if bias is not None else None
    rows = chunk_rows(xp, X, W.shape[0], acc, chunk_size, backward=True,
                      grads_bytes=dW.nbytes + (dX.nbytes if dX is not None else 0))

    def row_op(s, e, f):
        block(f, replace(args, n=e - s, lead_shape=(e - s,)), s, e)

    run_chunks(xp, X, W, bias, acc, rows, row_op, dW=dW, dX=dX, db=db)
    return dX, dW, db


def linear_local_partials(xp, X, W, bias, c0, args, target, chunk_size=None, weight=None):
    """The packed (N, 7) partials of this holder's logits X W_localᵀ (+ b_local), formed a
    chunk of rows at a time (never N x C_local at once)."""
    return _linear_partials(xp, X, W, bias, args, chunk_size, len(PACKED),
                            lambda f, a, s, e: local_partials(xp, f, c0, a, target[s:e], weight))


def linear_local_grads(xp, X, W, bias, c0, args, target, rows_all, row_scale, chunk_size=None,
                       input_grad=True, weight=None):
    """(dX share, dW_local, db_local) of this holder from the combined rows (the dX share is
    G W_local: the caller sums it over the holders)."""
    per_row = getattr(row_scale, "ndim", 0) == 1

    def block(f, a, s, e):
        sub = {k: v[s:e] for k, v in rows_all.items()}
        local_grad(xp, f, c0, a, sub, row_scale[s:e] if per_row else row_scale, target[s:e],
                   weight, out=f)

    return _linear_grads(xp, X, W, bias, args, chunk_size, input_grad, block)


# -- token log-probabilities and entropy (gpuce.tokens) -------------------------------------------

TOKEN_PACKED = partials.TOKEN_FIELDS  # m, s, h, t: 32 bytes a row from each holder


def token_local_partials(xp, x2, c0, args, labels):
    """This holder's packed (N, 4) float64 token partials of its logits block ``x2``
    (N, C_local), classes [c0, c0 + C_local) of ``args.c``; ``labels`` the (N,) global tokens."""
    part = partials.token_block_partials(xp, x2, c0, args, labels)
    return xp.stack([part[k].astype(np.float64) for k in TOKEN_PACKED], axis=1)


def token_combine_rows(xp, gathered, args, labels):
    """Every row's log p, H and what the gradient needs (:func:`gpuce._partials.token_row_terms`)
    from the gathered (H, N, 4) partials, combined in holder order."""
    acc = args.acc
    parts = [{k: gathered[h, :, i].astype(acc) for i, k in enumerate(TOKEN_PACKED)}
             for h in range(gathered.shape[0])]
    return partials.token_row_terms(xp, partials.token_combine(xp, parts, acc), args, labels)


def token_local_grad(xp, x2, c0, args, rows, labels, g_logp=None, g_entropy=None, out=None):
    """This holder's gradient block of Σ g_l log p + g_H H from the combined ``rows``."""
    return partials.token_block_grad(xp, x2, c0, args, rows, labels, g_logp, g_entropy, out=out)


def token_linear_local_partials(xp, X, W, bias, c0, args, labels, chunk_size=None):
    """The packed (N, 4) token partials of this holder's logits X W_localᵀ (+ b_local), a
    chunk of rows at a time (never N x C_local at once)."""
    return _linear_partials(xp, X, W, bias, args, chunk_size, len(TOKEN_PACKED),
                            lambda f, a, s, e: token_local_partials(xp, f, c0, a, labels[s:e]))


def token_linear_local_grads(xp, X, W, bias, c0, args, labels, rows_all, g_logp=None,
                             g_entropy=None, chunk_size=None, input_grad=True):
    """(dX share, dW_local, db_local) of Σ g_l log p + g_H H for this holder from the combined
    rows (the dX share is G W_local: the caller sums it over the holders)."""
    def block(f, a, s, e):
        sub = {k: v[s:e] for k, v in rows_all.items()}
        token_local_grad(xp, f, c0, a, sub, labels[s:e], None if g_logp is None else g_logp[s:e],
                         None if g_entropy is None else g_entropy[s:e], out=f)

    return _linear_grads(xp, X, W, bias, args, chunk_size, input_grad, block)
