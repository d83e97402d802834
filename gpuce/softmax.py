"""Stable softmax, log_softmax and logsumexp over one axis, on NumPy or CuPy arrays.

All three subtract the maximum along ``axis`` first (scipy's convention: a
non-finite maximum is replaced by 0), so no input overflows; probabilities are
``exp((x - m) - log s)``, never ``exp(x - lse)`` with a rounded lse.  float16 and bfloat16
inputs are computed in float32; results have the input's dtype (rounded once from float32,
to nearest even).  On CuPy one
ReductionKernel pass computes the log-sum-exp (online max / sum-exp) and, for
softmax / log_softmax, one ElementwiseKernel pass maps ``x - lse``.
"""

from __future__ import annotations

import numpy as np

from ._backend import array_module, asarray
from ._blocks import row_blocks
from ._dask import map_rows
from ._dispatch import backends
from ._validation import acc_dtype, check_axis, check_float

# The NumPy path walks the rows in blocks of about this many elements (at least one row).
NUMPY_BLOCK_ELEMENTS = 1 << 18


def _prepare(x, axis):
    xp = array_module(x)
    x = asarray(xp, x)
    check_float(x, "x")
    axis = check_axis(axis, x.ndim)
    return xp, x, axis


def _numpy_rows(x, axis, mode):
    """The NumPy path of logsumexp ("lse"), softmax ("softmax") and log_softmax ("log"),
    computed in blocks of rows (:func:`gpuce._blocks.row_blocks` over the other axes) and
    written into the output block by block, so the temporaries are about two blocks of
    NUMPY_BLOCK_ELEMENTS accumulation-dtype elements (at least one row), never the input's
    size.  Per row: m = max_j x_j (a non-finite m is replaced by 0 as ms), t = x - ms,
    ls = log sum_j exp(t); lse = m + ls, log_softmax = t - ls, softmax = exp(t - ls)."""
    acc = acc_dtype(x.dtype)
    xm = np.moveaxis(x, axis, -1)
    lead, c = xm.shape[:-1], xm.shape[-1]
    if mode == "lse":
        out = np.empty(lead, x.dtype)
        if c == 0:
            out.fill(-np.inf)
            return out
        outm = out
    else:
        out = np.empty_like(x)  # the input's memory layout, as an elementwise result
        if c == 0:
            return out
        outm = np.moveaxis(out, axis, -1)
    with np.errstate(all="ignore"):
        for index, _, _ in row_blocks(lead, NUMPY_BLOCK_ELEMENTS // c):
            xb = xm[index]
            m = xb.max(axis=-1, keepdims=True).astype(acc)
            finite = np.isfinite(m)
            ms = np.where(finite, m, 0).astype(acc)
            t = np.subtract(xb, ms, dtype=acc)
            e = np.exp(t)
            ls = np.log(e.sum(axis=-1, keepdims=True))
            lse = np.where(finite, ms, m) + ls
            if mode == "lse":
                outm[index] = lse[..., 0]
                continue
            t -= ls
            if mode == "softmax":
                np.exp(t, out=t)
            np.copyto(t, np.nan, where=~np.isfinite(lse))
            outm[index] = t
    return out


def _norm_cupy(x, axis):
    import cupy as cp

    from ._cupy_kernels import get_kernel

    acc = acc_dtype(x.dtype)
    shape = x.shape[:axis] + (1,) + x.shape[axis + 1:]
    mx, ls = cp.empty(shape, acc), cp.empty(shape, acc)
    if mx.size and x.shape[axis] == 0:
        mx.fill(-np.inf)
        ls.fill(-np.inf)
    elif mx.size:
        get_kernel("gpuce_lse", T=x.dtype.name, A=acc.name)(x, mx, ls, axis=axis, keepdims=True)
    return mx, ls


@backends("x", dask=map_rows(keep_axis=False))
def logsumexp(x, axis=-1):
    """Log-sum-exp along ``axis``: ``lse = m + log sum_j exp(x_j - m)``, ``m = max_j x_j``.

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray, float16, bfloat16 (ml_dtypes), float32 or float64
    axis : int, default -1

    Returns
    -------
    array of ``x``'s type and dtype, with ``axis`` removed.  A row of all -inf
    gives -inf, a row with +inf gives +inf, a row with NaN gives NaN (as
    scipy.special.logsumexp).  An empty axis gives -inf.

    See Also
    --------
    scipy.special.logsumexp, torch.logsumexp
    """
    xp, x, axis = _prepare(x, axis)
    if xp is np:
        return _numpy_rows(x, axis, "lse")
    mx, ls = _norm_cupy(x, axis)
    return (mx + ls).astype(x.dtype).squeeze(axis)


def _map(x, axis, mode, kernel_name):
    xp, x, axis = _prepare(x, axis)
    if xp is np:
        return _numpy_rows(x, axis, mode)
    acc = acc_dtype(x.dtype)
    from ._cupy_kernels import get_kernel

    mx, ls = _norm_cupy(x, axis)
    return get_kernel(kernel_name, T=x.dtype.name, A=acc.name)(x, mx, ls)


@backends("x", dask=map_rows(keep_axis=True))
def softmax(x, axis=-1):
    """Softmax along ``axis``: ``y_j = exp(x_j - lse)`` (formed as ``exp((x_j - m) - log s)``).

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray, float16, bfloat16 (ml_dtypes), float32 or float64
    axis : int, default -1

    Returns
    -------
    array like ``x``.  Rows containing NaN or +inf, or only -inf, give NaN (as
    scipy.special.softmax).

    See Also
    --------
    scipy.special.softmax, torch.softmax
    """
    return _map(x, axis, "softmax", "gpuce_softmax")


@backends("x", dask=map_rows(keep_axis=True))
def log_softmax(x, axis=-1):
    """Log-softmax along ``axis``: ``x_j - lse`` (never ``log(softmax)``, which underflows).

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray, float16, bfloat16 (ml_dtypes), float32 or float64
    axis : int, default -1

    See Also
    --------
    scipy.special.log_softmax, torch.log_softmax

    Rows containing NaN or +inf, or only -inf, give NaN.
    """
    return _map(x, axis, "log", "gpuce_log_softmax")
