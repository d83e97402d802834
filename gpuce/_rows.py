"""Rules every path applies to the rows of one call, written once: the label range check, the
"mean" reduction's denominator and the L2 penalty's sum of squares.  Used by the block walk
(gpuce.sce), the chunked linear model (gpuce.linear) and the dask blocks (gpuce._dask)."""

from __future__ import annotations

import numpy as np

from ._validation import acc_dtype


def check_labels(xp, y, a):
    """Raise for the first label outside [0, C) other than ignore_index (one sync on CuPy)."""
    if xp is np:
        from ._sce_numpy import check_labels as check

        return check(y.astype(np.int64, copy=False), a)
    from ._sce_cupy import check_labels as check

    return check(xp, y, a)


def mean_denominator(xp, y, weight, a) -> float:
    """The "mean" reduction's denominator over the rows of ``y`` (all rows, or one dask
    block's), as softmax_cross_entropy: the weight sum of the non-ignored labels, or the row
    count for probability targets.  One sync on CuPy."""
    if a.kind != "label":
        return float(np.prod(y.shape[:-1], dtype=np.int64))
    y = y.ravel()
    if y.dtype.kind == "u":  # compared with a negative ignore_index as int64 (checked to fit)
        y = y.astype(np.int64)
    # rows with a label outside [0, C) (check_labels=False: NaN rows) count as ignored here
    active = (y != a.ignore_index) & (y >= 0) & (y < a.c)
    if weight is None:
        row_weight = active.astype(a.acc)
    else:
        row_weight = xp.where(active, weight[xp.where(active, y, 0)], 0).astype(a.acc)
    return float(row_weight.sum(dtype=np.float64))


def sum_squares(xp, W):
    """Σ W² of a 2-D W in the accumulation dtype.  On the GPU a ReductionKernel over each
    row, then CuPy's sum of the C partials: a ReductionKernel over all elements (axis=None)
    runs on a single block in CuPy, far too few for a large W."""
    acc = acc_dtype(W.dtype)
    if xp is np:
        w = W.astype(acc, copy=False).ravel()
        return acc.type(np.dot(w, w))
    from ._cupy_kernels import get_kernel

    rows = xp.empty(W.shape[0], acc)
    get_kernel("gpuce_sumsq", T=W.dtype.name, A=acc.name)(W, rows, axis=1)
    return rows.sum(dtype=acc)
