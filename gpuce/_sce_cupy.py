"""CuPy softmax cross-entropy: host code launching the portable kernels.

Launch sequence for one call (N rows, C classes):

1. ``gpuce_label_check`` (integer labels only): one small kernel writing the
   first bad position, one 8-byte read -- the only host sync.
2. ``gpuce_sce_stats_*`` (ReductionKernel): the one read of the logits (and
   targets) for the loss: per-row lse and loss terms.
3. ``gpuce_sce_rows`` (ElementwiseKernel over N): per-row loss and gradient
   coefficient; the reduction is a CuPy sum on the device.
4. ``gpuce_sce_grad_*`` (ElementwiseKernel, only with return_grad): the second
   read of the logits and the one write of the gradient, reusing lse and the
   coefficients of step 2-3 (nothing is recomputed from a third pass).

The mean's denominator stays on the device, so the gradient's scale needs no sync.
"""

from __future__ import annotations

import numpy as np

from ._cupy_kernels import get_kernel
from ._validation import SceArgs, label_error


def check_labels(cp, lbl, a: SceArgs):
    if lbl.size == 0:
        return
    first = cp.full(1, lbl.size, dtype=cp.int64)
    get_kernel("gpuce_label_check", I=lbl.dtype.name)(lbl.ravel(), a.c, a.ignore_index, first)
    pos = int(first.get()[0])
    if pos < lbl.size:
        raise label_error(pos, int(lbl.ravel()[pos].get()), a.lead_shape, a.c, a.ignore_index)


def softmax_cross_entropy(x2, target, weight, a: SceArgs, grad_out):
    """Same contract as :func:`gpuce._sce_numpy.softmax_cross_entropy`, on CuPy arrays;
    ``total`` is a 0-d device array (no sync)."""
    import cupy as cp

    n, c = x2.shape
    acc = a.acc
    tname = x2.dtype.name
    aname = acc.name
    eps = a.label_smoothing
    eps_c = eps / c
    ome = 1.0 - eps
    w = cp.ones(c, acc) if weight is None else weight.astype(acc, copy=False)
    col = cp.arange(c, dtype=cp.int32)
    lse, tlab, smooth, asum = (cp.empty(n, acc) for _ in range(4))

    if a.kind == "label":
        lbl = target
        if lbl.dtype not in (np.int32, np.int64) or (
            lbl.dtype == np.int32 and not -(2**31) <= a.ignore_index < 2**31
        ):
            lbl = lbl.astype(cp.int64)
        check_labels(cp, lbl, a)
        iname = lbl.dtype.name
        lbl2 = lbl[:, None]
        get_kernel("gpuce_sce_stats_label", T=tname, A=aname, I=iname)(
            x2, lbl2, col, w, eps_c, a.ignore_index, lse, tlab, smooth, asum, axis=1
        )
        active = lbl != a.ignore_index
        wk = cp.where(active, w[cp.where(active, lbl, 0)], 0).astype(acc)
        wl = (ome * wk).astype(acc)
        denom = wk.sum(dtype=cp.float64)
    else:
        y = target
        get_kernel("gpuce_sce_stats_prob", T=tname, A=aname, Y=y.dtype.name)(
            x2, y, w, ome, eps_c, lse, tlab, smooth, asum, axis=1
        )
        active = True
        wl = cp.zeros(n, acc)
        denom = cp.asarray(float(n), dtype=cp.float64)

    loss, g = get_kernel("gpuce_sce_rows", A=aname)(active, lse, tlab, smooth, asum, wl, a.z_loss)
    if a.reduction == "mean":
        nz = denom != 0
        scale = cp.where(nz, 1.0 / cp.where(nz, denom, 1.0), 0.0).astype(acc)
    else:
        scale = cp.ones((), acc)

    if grad_out is not None:
        if a.kind == "label":
            get_kernel("gpuce_sce_grad_label", T=tname, A=aname, I=iname)(
                x2, lse[:, None], g[:, None], wl[:, None], lbl2, col, w, eps_c, scale,
                a.ignore_index, grad_out,
            )
        else:
            get_kernel("gpuce_sce_grad_prob", T=tname, A=aname, Y=y.dtype.name)(
                x2, y, lse[:, None], g[:, None], w, ome, eps_c, scale, grad_out
            )
    if a.reduction == "none":
        return loss, None
    total = loss.sum(dtype=cp.float64)
    if a.reduction == "mean":
        total = total * scale.astype(cp.float64)
    return loss, total.astype(acc)
