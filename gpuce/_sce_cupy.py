"""CuPy softmax cross-entropy: host code launching the GPU kernels.

Common prologue (no host sync except the label check):

1. ``gpuce_label_check`` (integer labels only): one small kernel writing the first bad
   position, one 8-byte read -- the only host sync of a call (made after the fused launch).
2. per-row label weights (CuPy array ops), the mean's denominator (CuPy's sum) and the
   gradient scale as device arrays, so no kernel waits on the host.

``impl="portable"`` (CuPy ElementwiseKernel / ReductionKernel, two reads + one write):

3. ``gpuce_sce_stats_*`` (ReductionKernel): per-row lse and loss terms, one read.
4. ``gpuce_sce_rows`` (ElementwiseKernel over N): per-row loss and gradient coefficient.
5. ``gpuce_sce_grad_*`` (ElementwiseKernel): second read and the one write of the gradient,
   reusing lse and the coefficients of 3-4.

``impl="fused"`` (RawKernel family of kernels/gpuce_sce_fused.cu, see gpuce._fused): one
launch reads each row once and writes loss, lse and the gradient.
"""

from __future__ import annotations

import numpy as np

from ._cupy_kernels import get_kernel
from ._validation import SceArgs, label_error

last_variant = None  # the fused variant of the latest fused call (for benchmarks and tests)


def kernel_labels(cp, target, a: SceArgs):
    """The labels as the kernels read them: a contiguous int32 (when ignore_index fits) or
    int64 vector."""
    lbl = target
    if lbl.dtype not in (np.int32, np.int64) or (
        lbl.dtype == np.int32 and not -(2**31) <= a.ignore_index < 2**31
    ):
        lbl = lbl.astype(cp.int64)
    return cp.ascontiguousarray(lbl)


def check_labels(cp, target, a: SceArgs):
    """Raise for the first out-of-range label (one sync)."""
    lbl = kernel_labels(cp, target, a)
    finish_label_check(lbl, start_label_check(cp, lbl, a), a)


def start_label_check(cp, lbl, a: SceArgs):
    """Launch the label check; returns the device scalar it writes (no sync)."""
    first = cp.full(1, lbl.size, dtype=cp.int64)
    if lbl.size:
        get_kernel("gpuce_label_check", I=lbl.dtype.name)(lbl.ravel(), a.c, a.ignore_index, first)
    return first


def label_weights(cp, lbl, w, a: SceArgs):
    """Each row's weight w[t] (0 for ignored rows and, until the check raises, for
    out-of-range labels) in the accumulation dtype."""
    ok = (lbl != a.ignore_index) & (lbl >= 0) & (lbl < a.c)
    return cp.where(ok, w[cp.where(ok, lbl, 0)], 0).astype(a.acc)


def finish_label_check(lbl, first, a: SceArgs):
    """Read the check's result (the one host sync of a call) and raise for a bad label."""
    pos = int(first.get()[0])
    if pos < lbl.size:
        raise label_error(pos, int(lbl.ravel()[pos].get()), a.lead_shape, a.c, a.ignore_index)


def softmax_cross_entropy(x2, target, weight, a: SceArgs, grad_out, impl="portable"):
    """Same contract as :func:`gpuce._sce_numpy.softmax_cross_entropy`, on CuPy arrays;
    ``total`` is a 0-d device array (no sync).

    The fused path reads the label check's result after its launch (the kernel turns an
    out-of-range label into a NaN row, never an out-of-bounds read), so the one host sync
    comes after the work; with ``grad_out`` the logits themselves, or on the portable path,
    the check is read before anything is written."""
    import cupy as cp

    n, c = x2.shape
    acc = a.acc
    wuser = None if weight is None else cp.ascontiguousarray(weight.astype(acc, copy=False))
    w = cp.ones(c, acc) if wuser is None else wuser  # the portable kernels read a weight vector

    lbl, pending = None, None
    if a.kind == "label":
        lbl = kernel_labels(cp, target, a)
        if not a.labels_checked:
            pending = start_label_check(cp, lbl, a)
            if impl != "fused" or grad_out is x2:
                finish_label_check(lbl, pending, a)
                pending = None
        wk = label_weights(cp, lbl, w, a)
        denom = wk.sum(dtype=cp.float64)
    else:
        denom = cp.asarray(float(n), dtype=cp.float64)
    nz = denom != 0
    if a.reduction == "mean":
        scale = cp.where(nz, 1.0 / cp.where(nz, denom, 1.0), 0.0).astype(acc)
    else:
        scale = cp.ones((), acc)

    if impl == "fused":
        loss = _fused(cp, x2, lbl, target if a.kind == "prob" else None, wuser, a, scale, grad_out)
        if pending is not None:
            finish_label_check(lbl, pending, a)
    else:
        if lbl is not None:
            active = lbl != a.ignore_index
        else:
            active, wk = True, None
        loss = _portable(cp, x2, lbl, target if a.kind == "prob" else None, w, a, scale, grad_out,
                         active, wk)
    if a.reduction == "none":
        return loss, None
    total = loss.sum(dtype=cp.float64)
    if a.reduction == "mean":  # divided in float64, as the NumPy path does
        total = cp.where(nz, total / cp.where(nz, denom, 1.0), 0.0)
    return loss, total.astype(acc)


def _portable(cp, x2, lbl, y, w, a, scale, grad_out, active, wk):
    n, c = x2.shape
    acc = a.acc
    tname, aname = x2.dtype.name, acc.name
    eps_c = a.label_smoothing / c
    ome = 1.0 - a.label_smoothing
    col = cp.arange(c, dtype=cp.int32)
    mx, ls, tlab, smooth, asum = (cp.empty(n, acc) for _ in range(5))
    if lbl is not None:
        wl = (ome * wk).astype(acc)  # (1 - eps) w_k per row
        iname = lbl.dtype.name
        lbl2 = lbl[:, None]
        get_kernel("gpuce_sce_stats_label", T=tname, A=aname, I=iname)(
            x2, lbl2, col, w, eps_c, a.ignore_index, mx, ls, tlab, smooth, asum, axis=1
        )
    else:
        get_kernel("gpuce_sce_stats_prob", T=tname, A=aname, Y=y.dtype.name)(
            x2, y, w, ome, eps_c, mx, ls, tlab, smooth, asum, axis=1
        )
        wl = cp.zeros(n, acc)
    loss, g = get_kernel("gpuce_sce_rows", A=aname)(active, mx, ls, tlab, smooth, asum, wl, a.z_loss)
    if grad_out is not None:
        if lbl is not None:
            get_kernel("gpuce_sce_grad_label", T=tname, A=aname, I=iname)(
                x2, mx[:, None], ls[:, None], g[:, None], wl[:, None], lbl2, col, w, eps_c, scale,
                a.ignore_index, grad_out,
            )
        else:
            get_kernel("gpuce_sce_grad_prob", T=tname, A=aname, Y=y.dtype.name)(
                x2, y, mx[:, None], ls[:, None], g[:, None], w, ome, eps_c, scale, grad_out
            )
    return loss


def _unit_cols(cp, arr):
    """``arr`` if its columns are contiguous (any row stride), else a C-contiguous copy."""
    return arr if arr.strides[1] == arr.itemsize else cp.ascontiguousarray(arr)


def _fused(cp, x2, lbl, y, w, a, scale, grad_out):
    global last_variant
    from . import _fused as F

    n, _ = x2.shape
    xk = _unit_cols(cp, x2)  # labels and weights arrive as dense vectors already
    if y is not None:
        y = _unit_cols(cp, y.astype(x2.dtype, copy=False))
    out = None
    if grad_out is not None:
        if grad_out is x2:  # inplace: write into the kernel's own input when it is x2 itself
            out = xk
        else:
            out = _unit_cols(cp, grad_out)
    loss = cp.empty(n, a.acc)
    lse = cp.empty(n, a.acc)
    last_variant = F.launch(xk, lbl, y, w, a, scale, loss, lse, out)
    if grad_out is not None and out is not grad_out:
        grad_out[...] = out
    return loss
