"""Stable softmax, log_softmax and logsumexp over one axis, on NumPy or CuPy arrays.

All three subtract the maximum along ``axis`` first (scipy's convention: a
non-finite maximum is replaced by 0), so no input overflows; probabilities are
``exp((x - m) - log s)``, never ``exp(x - lse)`` with a rounded lse.  float16 inputs are
computed in float32; results have the input's dtype.  On CuPy one
ReductionKernel pass computes the log-sum-exp (online max / sum-exp) and, for
softmax / log_softmax, one ElementwiseKernel pass maps ``x - lse``.
"""

from __future__ import annotations

import numpy as np

from . import _validation as V
from ._backend import array_module, asarray
from ._dask import along_axis


def _prepare(x, axis):
    xp = array_module(x)
    x = asarray(xp, x)
    V.check_float(x, "x")
    axis = V.check_axis(axis, x.ndim)
    return xp, x, axis


def _norm_numpy(x, axis, acc):
    """The normaliser along ``axis`` (keepdims) as (mx, ls): lse = mx + ls, and
    probabilities are exp((x - mx) - ls) (no rounded lse inside the exponent)."""
    xa = x.astype(acc, copy=False)
    shape = xa.shape[:axis] + (1,) + xa.shape[axis + 1:]
    if xa.shape[axis] == 0:
        return np.full(shape, -np.inf, acc), np.full(shape, -np.inf, acc)
    with np.errstate(all="ignore"):
        m = np.max(xa, axis=axis, keepdims=True)
        ms = np.where(np.isfinite(m), m, 0).astype(acc)
        ls = np.log(np.sum(np.exp(xa - ms), axis=axis, keepdims=True))
        return np.where(np.isfinite(m), ms, m).astype(acc), ls.astype(acc)


def _norm_cupy(x, axis):
    import cupy as cp

    from ._cupy_kernels import get_kernel

    acc = V.acc_dtype(x.dtype)
    shape = x.shape[:axis] + (1,) + x.shape[axis + 1:]
    mx, ls = cp.empty(shape, acc), cp.empty(shape, acc)
    if mx.size and x.shape[axis] == 0:
        mx.fill(-np.inf)
        ls.fill(-np.inf)
    elif mx.size:
        get_kernel("gpuce_lse", T=x.dtype.name, A=acc.name)(x, mx, ls, axis=axis, keepdims=True)
    return mx, ls


@along_axis(keep_axis=False)
def logsumexp(x, axis=-1):
    """Log-sum-exp along ``axis``: ``lse = m + log sum_j exp(x_j - m)``, ``m = max_j x_j``.

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray, float16/32/64
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
    mx, ls = _norm_numpy(x, axis, V.acc_dtype(x.dtype)) if xp is np else _norm_cupy(x, axis)
    return (mx + ls).astype(x.dtype).squeeze(axis)


def _map(x, axis, numpy_fn, kernel_name):
    xp, x, axis = _prepare(x, axis)
    acc = V.acc_dtype(x.dtype)
    if xp is np:
        mx, ls = _norm_numpy(x, axis, acc)
        with np.errstate(all="ignore"):
            y = numpy_fn((x.astype(acc, copy=False) - mx) - ls)
            return np.where(np.isfinite(mx + ls), y, np.nan).astype(x.dtype, copy=False)
    from ._cupy_kernels import get_kernel

    mx, ls = _norm_cupy(x, axis)
    return get_kernel(kernel_name, T=x.dtype.name, A=acc.name)(x, mx, ls)


@along_axis(keep_axis=True)
def softmax(x, axis=-1):
    """Softmax along ``axis``: ``y_j = exp(x_j - lse)`` (formed as ``exp((x_j - m) - log s)``).

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray, float16/32/64
    axis : int, default -1

    Returns
    -------
    array like ``x``.  Rows containing NaN or +inf, or only -inf, give NaN (as
    scipy.special.softmax).

    See Also
    --------
    scipy.special.softmax, torch.softmax
    """
    return _map(x, axis, np.exp, "gpuce_softmax")


@along_axis(keep_axis=True)
def log_softmax(x, axis=-1):
    """Log-softmax along ``axis``: ``x_j - lse`` (never ``log(softmax)``, which underflows).

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray, float16/32/64
    axis : int, default -1

    See Also
    --------
    scipy.special.log_softmax, torch.log_softmax

    Rows containing NaN or +inf, or only -inf, give NaN.
    """
    return _map(x, axis, lambda v: v, "gpuce_log_softmax")
