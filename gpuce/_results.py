"""What gpuce's losses return, in one place: the result types (SceStats, SceRows,
LinearGrads) and their assembly (the public return tuple, statistics shaped for the caller,
statistics of one call gathered from row blocks or chunks)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._validation import SceArgs


class SceStats(NamedTuple):
    """Statistics computed in the same pass as the loss (``return_stats=True``).

    z_loss : the z-loss part of the loss, sum_i z lse_i^2 over the non-ignored rows, reduced
        like the loss (per row for reduction="none", 0 for ignored rows).
    accuracy : integer labels only (None for probability targets): the share of non-ignored
        rows whose label attains the row's maximum of the (capped) logits, ties counting as
        correct and NaN rows as wrong; NaN when no row is counted.  Per row (1.0 / 0.0, NaN
        for ignored rows) for reduction="none".
    lse : (N...) per-row log-sum-exp of the (capped) logits, every row including ignored ones.
    predicted : (N...) int64, the predicted class of every row (ignored ones included): the
        index of the row's maximum of the (capped) logits, the lowest index among ties, -1
        for a row holding a NaN.  (The backends leave it None; gpuce._rows.run_rows fills it.)
    """

    z_loss: object
    accuracy: object
    lse: object
    predicted: object = None


class SceRows(NamedTuple):
    """What a backend returns for validated (N, C) logits.

    rows : (N,) per-row losses (acc dtype); may be None for reduction "sum"/"mean" when the
        backend does not write them (the fused GPU path).
    total : 0-d reduced loss for "sum"/"mean" (the mean already divided), None for "none".
    stats : SceStats when ``args.return_stats``, else None.
    """

    rows: object
    total: object
    stats: object = None


class LinearGrads(NamedTuple):
    """Gradients of the returned loss: ``X`` (N, D) or None, ``W`` (C, D), ``bias`` (C,) or None."""

    X: object
    W: object
    bias: object


def results(xp, args: SceArgs, loss, grad, st):
    """The public return value: loss, then grad (return_grad), then the statistics
    (return_stats) as a SceStats shaped like the loss (lse: logits.shape[:-1])."""
    out = (loss,) + ((grad,) if args.return_grad else ())
    if args.return_stats:
        out += (public_stats(xp, args, st),)
    return out if len(out) > 1 else loss


def public_stats(xp, args: SceArgs, st: SceStats) -> SceStats:
    """A backend's SceStats ((N,) rows) shaped for the caller."""
    lse = st.lse.reshape(args.lead_shape)
    predicted = st.predicted.reshape(args.lead_shape)
    if args.reduction == "none":
        return SceStats(st.z_loss.reshape(args.lead_shape),
                        None if st.accuracy is None else st.accuracy.reshape(args.lead_shape), lse,
                        predicted)
    return SceStats(xp.asarray(st.z_loss, dtype=args.acc),
                    None if st.accuracy is None else xp.asarray(st.accuracy, dtype=args.acc), lse,
                    predicted)


class BlockStats:
    """The statistics of one call assembled from row blocks (the block walk, the chunked
    linear model), each block run with the call's reduction (for "mean" with the whole call's
    denominator, ``SceArgs.denominator``) and return_stats.

    ``add`` takes a block's SceStats: its lse (and for "none" its per-row z-loss and
    accuracy) go to their rows; otherwise the z-loss part is added, and the number of
    correct rows recovered as ``rint(accuracy * counted)`` (counted: the block's
    non-ignored rows; exact while a block has fewer than 2^22 rows; a "mean" block's part comes
    divided by the whole call's denominator already).  ``finish()``
    gives the SceStats of the whole call in the backends' (N,)-row form.  Nothing is read
    back to the host on CuPy.
    """

    def __init__(self, xp, args: SceArgs):
        self.xp, self.args = xp, args
        none = args.reduction == "none"
        label = args.kind == "label"
        self.lse = xp.empty(args.n, args.acc)
        self.predicted = xp.empty(args.n, np.int64)
        self.z_rows = xp.zeros(args.n, args.acc) if none else None
        self.correct_rows = xp.full(args.n, np.nan, args.acc) if none and label else None
        self.z = xp.zeros((), np.float64)
        self.correct = xp.zeros((), np.float64)
        self.counted = xp.zeros((), np.float64)

    def add(self, r0, r1, st: SceStats, labels=None):
        xp, args = self.xp, self.args
        self.lse[r0:r1] = st.lse
        self.predicted[r0:r1] = st.predicted
        if args.reduction == "none":
            self.z_rows[r0:r1] = st.z_loss
            if self.correct_rows is not None:
                self.correct_rows[r0:r1] = st.accuracy
            return
        self.z += xp.asarray(st.z_loss, dtype=np.float64)
        if args.kind == "label":
            lab = labels.ravel()
            if lab.dtype.kind == "u":  # compared with a negative ignore_index as int64
                lab = lab.astype(np.int64)
            k = (lab != args.ignore_index).sum(dtype=np.float64)
            acc = xp.nan_to_num(xp.asarray(st.accuracy, dtype=np.float64))
            self.correct += xp.rint(acc * k)
            self.counted += k

    def finish(self) -> SceStats:
        xp, args = self.xp, self.args
        if args.reduction == "none":
            return SceStats(self.z_rows, self.correct_rows, self.lse, self.predicted)
        accuracy = None
        if args.kind == "label":
            accuracy = xp.where(self.counted > 0, self.correct / xp.maximum(self.counted, 1),
                                np.nan).astype(args.acc)
        return SceStats(self.z.astype(args.acc), accuracy, self.lse, self.predicted)
