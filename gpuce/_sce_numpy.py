"""NumPy softmax cross-entropy: the CPU backend and the GPU tests' oracle.

Vectorised and chunked over rows: the extra memory is a few chunk x C buffers
(about 2**18 elements each, per worker thread), never an N x C temporary.  One pass per chunk
computes the row max, exp, the loss terms and (optionally) the gradient.
The maths and conventions are those of ``kernels/gpuce_rowstat.cuh``; the row's loss and
gradient terms (coefficients, loss, the gradient's factor) are :mod:`gpuce._rowterms`, stated
once there for this path and gpuce.torch's.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _rowterms as terms
from ._results import SceRows, SceStats
from ._validation import SceArgs, label_error

CHUNK_ELEMENTS = 1 << 18
# Chunks are independent (disjoint rows of loss and grad), so large inputs are spread over
# threads: NumPy's ufuncs release the GIL.  Results do not depend on the thread count.
PARALLEL_MIN_ELEMENTS = 1 << 20


def _workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _with_errstate(fn, *args):
    with np.errstate(all="ignore"):  # errstate is per thread
        return fn(*args)


def rows_per_chunk(c: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(c, 1))


def check_labels(lbl, args: SceArgs):
    bad = (lbl != args.ignore_index) & ((lbl < 0) | (lbl >= args.c))
    if bad.any():
        pos = int(np.argmax(bad.ravel()))
        raise label_error(pos, lbl.ravel()[pos], args.lead_shape, args.c, args.ignore_index)


def softmax_cross_entropy(x2, target, weight, args: SceArgs, grad_out):
    """Per-row loss (acc dtype) and, if ``grad_out`` is given, the gradient written into it.

    ``x2`` is the (N, C) view of the logits; ``target`` is (N,) labels or (N, C)
    probabilities; ``grad_out`` is an (N, C) array of the logits' dtype (it may be
    ``x2`` itself for inplace=True).  Returns a :class:`SceRows` ``(loss_rows, total,
    stats)``: total is the reduced loss for "sum"/"mean" (None for "none"), stats a
    :class:`SceStats` with ``args.return_stats`` (else None).

    With ``args.softcap = s > 0`` the row's values are ``v = s tanh(f / s)``, computed in the
    chunk buffer (never a capped copy of the logits), and the gradient is multiplied by
    ``1 - tanh^2(f / s)``.  A label outside [0, C) other than ignore_index raises unless
    ``args.check_labels`` is False or ``args.labels_checked``; then its row's loss and gradient
    are NaN (it counts as a wrong prediction and adds nothing to the mean's denominator).
    """
    n, c = x2.shape
    acc = args.acc
    ops = terms.ArrayOps(np, acc)
    eps = args.label_smoothing
    z = args.z_loss
    w = None if weight is None else ops.widen(weight)

    if args.kind == "label":
        lbl = target.astype(np.int64, copy=False)
        if args.check_labels and not args.labels_checked:
            check_labels(lbl, args)
        active = lbl != args.ignore_index
        bad_label = active & ((lbl < 0) | (lbl >= c))  # only with check_labels=False
        valid = active & ~bad_label
        safe = np.where(valid, lbl, 0)
        # w_k of each row (0 for ignored and bad rows), its label term's coefficient wl (NaN
        # for a bad label) and the smoothing coefficients (eps/C) w_j
        label_weight = np.where(valid, w[safe] if w is not None else acc.type(1), acc.type(0)).astype(acc)
        label_coef = np.where(bad_label, acc.type(np.nan),
                              terms.label_coefficients(ops, label_weight, eps)).astype(acc)
        denom = float(label_weight.sum(dtype=np.float64)) if args.denominator is None else 0.0
        cw = terms.smoothing_coefficients(ops, w, eps, c)
        a_row = acc.type(0) if cw is None else acc.type(cw.sum(dtype=np.float64))
    else:
        active = np.ones(n, bool)
        bad_label = np.zeros(n, bool)
        denom = float(n)
    if args.denominator is not None:  # one block of a larger call: its denominator
        denom = float(args.denominator)
    scale = args.mean_scale(denom)

    loss = np.empty(n, acc)
    stats = args.return_stats
    cap = acc.type(args.softcap)
    if stats:
        lse_rows = np.empty(n, acc)
        z_rows = np.zeros(n, acc)
        correct_rows = np.zeros(n, acc) if args.kind == "label" else None
    r = rows_per_chunk(c)
    # Work directly in the gradient buffer when it has the accumulation dtype (no extra
    # copy pass); otherwise in a chunk-sized scratch buffer (one per worker thread).
    direct = grad_out is not None and grad_out.dtype == acc
    local = threading.local()

    def scratch(name, k):
        buf = getattr(local, name, None)
        if buf is None:
            buf = np.empty((min(r, n), c), acc)
            setattr(local, name, buf)
        return buf[:k]

    def chunk(r0):
        r1 = min(n, r0 + r)
        k = r1 - r0
        xc = x2[r0:r1]
        e = grad_out[r0:r1] if direct else scratch("e", k)
        if cap:
            # v = s tanh(f / s) in the chunk buffer; dcap = 1 - tanh^2 kept for the gradient
            np.divide(xc, cap, out=e, dtype=acc, casting="unsafe")  # xc may alias e
            np.tanh(e, out=e)
            if grad_out is not None:
                dcap = scratch("dcap", k)
                np.multiply(e, e, out=dcap)
                np.subtract(acc.type(1), dcap, out=dcap)
            e *= cap
            m = e.max(axis=1)
        else:
            m = xc.max(axis=1).astype(acc)
        finite = np.isfinite(m)
        ms = np.where(finite, m, 0).astype(acc)
        if cap:
            e -= ms[:, None]
        else:
            np.subtract(xc, ms[:, None], out=e, dtype=acc, casting="unsafe")  # x - m (xc may alias e)
        act = active[r0:r1]
        if args.kind == "label":
            rows = np.arange(k)
            lab_idx = safe[r0:r1]
            t = e[rows, lab_idx]  # x_k - m
            if cw is None:
                a_sum = np.zeros(k, acc)
                b = np.zeros(k, acc)
            else:
                a_sum = np.where(act, a_row, 0).astype(acc)
                nz = cw != 0
                b = e[:, nz] @ cw[nz] if not nz.all() else e @ cw
                b = np.where(act, b, 0).astype(acc)
            label_coef_chunk = label_coef[r0:r1]
        else:
            coef = terms.target_coefficients(ops, target[r0:r1], w, eps, c,
                                             out=scratch("coef", k))
            a_sum = coef.sum(axis=1)
            prod = scratch("prod", k)
            prod.fill(0)
            np.multiply(coef, e, out=prod, where=coef != 0)
            b = prod.sum(axis=1)
            label_coef_chunk = np.zeros(k, acc)
            t = np.zeros(k, acc)
        np.exp(e, out=e)
        s = e.sum(axis=1)
        ls = np.log(s)
        lse = ms + ls
        zt = terms.z_term(ops, z, lse)
        row_loss = terms.row_loss(ops, label_coef_chunk, t, ls, a_sum, b, zt)
        bad = ~finite | bad_label[r0:r1]
        row_loss = np.where(bad, np.nan, row_loss)
        loss[r0:r1] = np.where(act, row_loss, 0)
        if stats:
            lse_rows[r0:r1] = lse
            if z != 0:
                z_rows[r0:r1] = np.where(act, zt, 0)
            if correct_rows is not None:
                # the label attains the row max (t = v_k - m == 0 exactly), on a finite row
                ok = finite & ~bad_label[r0:r1] & (t == 0)
                correct_rows[r0:r1] = np.where(act, ok, np.nan)
        if grad_out is not None:
            # grad = scale * (softmax * G - coef - label_coef [j = k]), softmax = e / s
            g = terms.logit_grad_factor(ops, label_coef_chunk, a_sum, z, lse)
            e *= (g * scale / s).astype(acc)[:, None]
            if args.kind == "label":
                if cw is not None:
                    e -= (scale * cw).astype(acc)
                e[rows, lab_idx] -= (scale * label_coef_chunk).astype(acc)
            else:
                coef *= acc.type(scale)
                e -= coef
            if cap:
                e *= dcap
            e[bad] = np.nan
            e[~act] = 0
            if not direct:
                grad_out[r0:r1] = e

    starts = range(0, n, r)
    with np.errstate(all="ignore"):
        workers = min(_workers(), len(starts)) if n * c >= PARALLEL_MIN_ELEMENTS else 1
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda r0: _with_errstate(chunk, r0), starts))
        else:
            for r0 in starts:
                chunk(r0)
    if args.reduction == "none":
        st = SceStats(z_rows, correct_rows, lse_rows) if stats else None
        return SceRows(loss, None, st)
    total = float(loss.sum(dtype=np.float64))
    if args.reduction == "mean":
        total = 0.0 if denom == 0 else total / denom
    st = None
    if stats:
        z_total = float(z_rows.sum(dtype=np.float64)) * scale
        accuracy = None
        if correct_rows is not None:
            counted = int(active.sum())
            accuracy = acc.type(np.nansum(correct_rows, dtype=np.float64) / counted
                                if counted else np.nan)
        st = SceStats(acc.type(z_total), accuracy, lse_rows)
    return SceRows(loss, acc.type(total), st)
