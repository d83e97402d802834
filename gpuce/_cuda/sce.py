"""CuPy softmax cross-entropy: host code launching the GPU kernels.

No host synchronisation happens before the last launch of a call; the one read after it is
the kernels' status of the labels and the class weights (skipped with
``check_labels=False``), and it raises ValueError naming the first bad label or weight.  With
``inplace=True`` the check runs before the launch instead (one sync), so that an error leaves
the caller's logits untouched.

``impl="fused"`` (the RawKernels of kernels/gpuce_sce_fused.cu, launched by gpuce._cuda.fused):
at most two launches -- the prologue where the call needs one (the class weights' check; the
denominator of reduction "mean" with integer labels) and the fused kernel, which reads each row once, writes the gradient once and finishes the
batch sums on the device (float64 partials per block, the last block adding them in block
order: bit-identical run to run).  Per-row losses are written only for reduction "none",
per-row lse only when statistics are asked for.  Array conversions (labels of another
integer type, weights of another dtype, probability targets of another dtype, a non-unit
column stride) add a copy launch each, only when the caller's arrays need them.

``impl="portable"`` (CuPy ElementwiseKernel / ReductionKernel, two reads + one write):

1. ``gpuce_label_check`` (integer labels): the first bad position (atomicMin), read after
   the last launch;
2. per-row label weights and the mean's denominator and scale as device arrays (CuPy ops);
3. ``gpuce_sce_stats_*`` (ReductionKernel): per-row lse and loss terms, one read;
4. ``gpuce_sce_rows`` (ElementwiseKernel over N): per-row loss and gradient coefficient;
5. ``gpuce_sce_grad_*`` (ElementwiseKernel): second read and the one write of the gradient.
"""

from __future__ import annotations

import numpy as np

from . import fused
from .kernels import get_kernel
from .._results import SceRows, SceStats
from .._rowterms import ArrayOps, label_coefficients
from .._validation import SceArgs, first_bad_weight, label_error, raise_bad_weight


def kernel_labels(cp, target, args: SceArgs):
    """The labels as the kernels read them: a contiguous int32 (when ignore_index fits) or
    int64 vector."""
    lbl = target
    if lbl.dtype not in (np.int32, np.int64) or (
        lbl.dtype == np.int32 and not -(2**31) <= args.ignore_index < 2**31
    ):
        lbl = lbl.astype(cp.int64)
    return cp.ascontiguousarray(lbl)


def check_labels(cp, target, args: SceArgs):
    """Raise for the first out-of-range label (one sync)."""
    lbl = kernel_labels(cp, target, args)
    raise_bad_label(lbl, start_label_check(cp, lbl, args), args)


def start_label_check(cp, lbl, args: SceArgs):
    """Launch the label check; returns the device scalar it writes (no sync)."""
    first = cp.full(1, lbl.size, dtype=cp.int64)
    if lbl.size:
        get_kernel("gpuce_label_check", I=lbl.dtype.name)(lbl.ravel(), args.c, args.ignore_index,
                                                          first)
    return first


def raise_bad_label(lbl, first, args: SceArgs):
    """Read the check's result (the one host sync of a call) and raise for a bad label."""
    pos = int(first.get().ravel()[0])
    if pos < lbl.size:
        raise label_error(pos, int(lbl.ravel()[pos].get()), args.lead_shape, args.c,
                          args.ignore_index)


def raise_bad_inputs(lbl, w, status, args: SceArgs):
    """Read the fused path's status -- [first bad label position (N when none), first bad class
    weight (-1 when none)] -- in one 16-byte copy after the last launch, and raise for either."""
    first_label, first_weight = (int(v) for v in status.get())
    if (lbl is not None and args.kind == "label" and not args.labels_checked
            and first_label < lbl.size):
        raise label_error(first_label, int(lbl.ravel()[first_label].get()), args.lead_shape, args.c, args.ignore_index)
    raise_bad_weight(w, first_weight)


def _unit_cols(cp, arr):
    """``arr`` if its columns are contiguous (any row stride), else a C-contiguous copy."""
    return arr if arr.strides[1] == arr.itemsize else cp.ascontiguousarray(arr)


def _weight(cp, weight, acc):
    return None if weight is None else cp.ascontiguousarray(weight.astype(acc, copy=False))


def softmax_cross_entropy(x2, target, weight, args: SceArgs, grad_out, impl="fused", variant=None) -> SceRows:
    """Same contract as :func:`gpuce._sce_numpy.softmax_cross_entropy`, on CuPy arrays: a
    :class:`SceRows` whose ``total`` is a 0-d device array (no sync before the last launch).
    ``variant`` pins a fused variant (tests, benchmark)."""
    import cupy as cp

    if args.kind == "prob" and target.dtype != x2.dtype:
        # probability targets of another dtype are read in float32 (float64 for float64
        # logits), never rounded to the logits' dtype: the portable kernels take them so
        target = target.astype(np.float64 if x2.dtype == np.float64 else np.float32, copy=False)
        impl = "portable"
    if impl == "fused":
        return _fused_rows(cp, x2, target, weight, args, grad_out, variant)
    return _portable_rows(cp, x2, target, weight, args, grad_out)


def _z_rows(cp, lse, lbl, args):
    """Per-row z-loss parts z lse^2 (0 for ignored rows, and everywhere when z = 0)."""
    acc = args.acc
    if args.z_loss == 0.0:
        return cp.zeros(lse.shape, acc)
    z = acc.type(args.z_loss) * lse * lse
    return z if lbl is None else cp.where(lbl != args.ignore_index, z, acc.type(0)).astype(acc)


def _fused_rows(cp, x2, target, weight, args, grad_out, variant):
    n, c = x2.shape
    acc = args.acc
    ws = fused.workspace(cp)  # first: it refuses to be made inside a capture
    w = _weight(cp, weight, acc)
    lbl = y2 = None
    if args.kind == "label":
        lbl = kernel_labels(cp, target, args)
    else:
        y2 = _unit_cols(cp, target)
    xk = _unit_cols(cp, x2)
    out = None
    if grad_out is not None:
        out = xk if grad_out is x2 else _unit_cols(cp, grad_out)
    none = args.reduction == "none"
    # the one read-back: the fused kernel's status of the labels and the class weights
    check = args.check_labels and ((args.kind == "label" and not args.labels_checked)
                                   or w is not None)
    if check and grad_out is x2:  # in place: validate before the logits are overwritten (a sync)
        if args.kind == "label" and not args.labels_checked:
            raise_bad_label(lbl, start_label_check(cp, lbl, args), args)
        if w is not None:
            raise_bad_weight(w, first_bad_weight(cp, w))
        check = False
    rows = cp.empty(n, acc) if none else None
    total = None if none else cp.empty((), acc)
    lse = cp.empty(n, acc) if args.return_stats else None
    correct = cp.empty(n, acc) if (args.return_stats and none and args.kind == "label") else None
    stats_out = cp.empty(2, acc) if (args.return_stats and not none) else None
    bad = cp.empty(2, cp.int64) if check else None
    fused.launch(
        xk, lbl, y2, w, acc=acc, eps=args.label_smoothing, z=args.z_loss, softcap=args.softcap,
        ignore_index=args.ignore_index, reduction=args.reduction, denominator=args.denominator,
        loss_out=rows, lse_out=lse,
        correct_out=correct, grad_out=out, total_out=total, stats_out=stats_out, bad_out=bad,
        pinned=variant, ws=ws)
    if grad_out is not None and out is not grad_out:  # a unit-column copy was written
        grad_out[...] = out
    stats = None
    if args.return_stats:
        if none:
            stats = SceStats(_z_rows(cp, lse, lbl, args), correct, lse)
        else:
            stats = SceStats(stats_out[0], stats_out[1] if args.kind == "label" else None, lse)
    if bad is not None:  # the one read-back, after the last launch
        raise_bad_inputs(lbl, w, bad, args)
    return SceRows(rows, total, stats)


def _portable_rows(cp, x2, target, weight, args, grad_out):
    n, c = x2.shape
    acc = args.acc
    wuser = _weight(cp, weight, acc)
    w = cp.ones(c, acc) if wuser is None else wuser  # the portable kernels read a weight vector
    # the first bad class weight (-1: none), read after the last launch
    wbad = None if wuser is None else first_bad_weight(cp, wuser)
    lbl = pending = None
    if args.kind == "label":
        lbl = kernel_labels(cp, target, args)
        if args.check_labels and not args.labels_checked:
            pending = start_label_check(cp, lbl, args)
    weights_read = False
    if grad_out is x2 and args.check_labels:  # in place: validate before the logits are overwritten
        if pending is not None:
            raise_bad_label(lbl, pending, args)
            pending = None
        if wbad is not None:
            raise_bad_weight(wuser, wbad)
            weights_read = True
    if args.kind == "label":
        ok = (lbl != args.ignore_index) & (lbl >= 0) & (lbl < args.c)
        bad = (lbl != args.ignore_index) & ~ok
        wk = cp.where(ok, w[cp.where(ok, lbl, 0)], 0).astype(acc)  # the denominator's weights
        wl = cp.where(bad, acc.type(np.nan), label_coefficients(ArrayOps(cp, acc), wk, args.label_smoothing)).astype(acc)
        denom = wk.sum(dtype=cp.float64)
        active = lbl != args.ignore_index
    else:
        denom = cp.asarray(float(n), dtype=cp.float64)
        wl = cp.zeros(n, acc)
        active = cp.ones(n, bool)
    if args.denominator is not None:  # one block of a larger call: its denominator
        denom = cp.asarray(float(args.denominator), dtype=cp.float64)
    nz = denom != 0
    inv = cp.where(nz, 1.0 / cp.where(nz, denom, 1.0), 0.0) if args.reduction == "mean" else cp.ones((), cp.float64)
    if wbad is not None:  # a bad class weight: NaN results, as the fused kernels give
        inv = cp.where(wbad >= 0, np.nan, inv)
    scale = inv.astype(acc)
    tname, aname = x2.dtype.name, acc.name
    eps_c = args.label_smoothing / c
    ome = 1.0 - args.label_smoothing
    cap = acc.type(args.softcap)
    col = cp.arange(c, dtype=cp.int32)
    mx, ls, tlab, smooth, asum, hit = (cp.empty(n, acc) for _ in range(6))
    if lbl is not None:
        iname = lbl.dtype.name
        lbl2 = lbl[:, None]
        get_kernel("gpuce_sce_stats_label", T=tname, A=aname, I=iname)(
            x2, lbl2, col, w, eps_c, args.ignore_index, cap, mx, ls, tlab, smooth, asum, hit,
            axis=1)
    else:
        y2 = target
        get_kernel("gpuce_sce_stats_prob", T=tname, A=aname, Y=y2.dtype.name)(
            x2, y2, w, ome, eps_c, cap, mx, ls, tlab, smooth, asum, hit, axis=1)
    loss, g = get_kernel("gpuce_sce_rows", A=aname)(active, mx, ls, tlab, smooth, asum, wl, args.z_loss)
    if wbad is not None:
        loss = cp.where((wbad >= 0) & active, acc.type(np.nan), loss).astype(acc)
    if grad_out is not None:
        if lbl is not None:
            get_kernel("gpuce_sce_grad_label", T=tname, A=aname, I=iname)(
                x2, mx[:, None], ls[:, None], g[:, None], wl[:, None], lbl2, col, w, eps_c, scale,
                args.ignore_index, cap, grad_out)
        else:
            get_kernel("gpuce_sce_grad_prob", T=tname, A=aname, Y=y2.dtype.name)(
                x2, y2, mx[:, None], ls[:, None], g[:, None], w, ome, eps_c, scale, cap, grad_out)
    total = None
    if args.reduction != "none":
        total = (loss.sum(dtype=cp.float64) * inv).astype(acc)
    stats = None
    if args.return_stats:
        lse = (mx + ls).astype(acc)
        zrows = _z_rows(cp, lse, lbl, args)
        correct = None
        if lbl is not None:
            correct = cp.where(active, cp.where(cp.isnan(wl), acc.type(0), hit), acc.type(np.nan)).astype(acc)
        if args.reduction == "none":
            stats = SceStats(zrows, correct, lse)
        else:
            acc_total = None
            if correct is not None:
                cnt = active.sum(dtype=cp.float64)
                acc_total = cp.where(cnt > 0, cp.nansum(correct, dtype=cp.float64) / cp.where(cnt > 0, cnt, 1.0),
                                     np.nan).astype(acc)
            stats = SceStats((zrows.sum(dtype=cp.float64) * inv).astype(acc), acc_total, lse)
    if pending is not None:
        raise_bad_label(lbl, pending, args)
    if wbad is not None and args.check_labels and not weights_read:
        raise_bad_weight(wuser, wbad)
    return SceRows(loss, total, stats)
