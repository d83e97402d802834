"""Stable softmax, log_softmax and logsumexp over one axis, on NumPy or CuPy arrays.

All three subtract the maximum along ``axis`` first (scipy's convention: a
non-finite maximum is replaced by 0), so no input overflows.  float16 inputs are
computed in float32; results have the input's dtype.  On CuPy one
ReductionKernel pass computes the log-sum-exp (online max / sum-exp) and, for
softmax / log_softmax, one ElementwiseKernel pass maps ``x - lse``.
"""

from __future__ import annotations

import numpy as np

from . import _validation as V
from ._backend import array_module, asarray


def _prepare(x, axis):
    xp = array_module(x)
    x = asarray(xp, x)
    V.check_float(x, "x")
    axis = V.check_axis(axis, x.ndim)
    return xp, x, axis


def _lse_numpy(x, axis, acc):
    """Log-sum-exp along ``axis`` with keepdims, in dtype ``acc``."""
    xa = x.astype(acc, copy=False)
    with np.errstate(all="ignore"):
        m = np.max(xa, axis=axis, keepdims=True) if xa.shape[axis] else np.full(
            xa.shape[:axis] + (1,) + xa.shape[axis + 1:], -np.inf, acc)
        ms = np.where(np.isfinite(m), m, 0).astype(acc)
        s = np.sum(np.exp(xa - ms), axis=axis, keepdims=True)
        return ms + np.log(s)


def _lse_cupy(x, axis, out_dtype):
    import cupy as cp

    from ._cupy_kernels import get_kernel

    acc = V.acc_dtype(x.dtype)
    out_shape = x.shape[:axis] + (1,) + x.shape[axis + 1:]
    out = cp.empty(out_shape, out_dtype)
    if out.size == 0:
        return out
    if x.shape[axis] == 0:
        out.fill(-np.inf)
        return out
    k = get_kernel("gpuce_lse", T=x.dtype.name, A=acc.name, O=np.dtype(out_dtype).name)
    k(x, out, axis=axis, keepdims=True)
    return out


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
    if xp is np:
        return _lse_numpy(x, axis, V.acc_dtype(x.dtype)).astype(x.dtype).squeeze(axis)
    return _lse_cupy(x, axis, x.dtype).squeeze(axis)


def _map(x, axis, numpy_fn, kernel_name):
    xp, x, axis = _prepare(x, axis)
    acc = V.acc_dtype(x.dtype)
    if xp is np:
        lse = _lse_numpy(x, axis, acc)
        with np.errstate(all="ignore"):
            y = numpy_fn(x.astype(acc, copy=False) - lse)
            return np.where(np.isfinite(lse), y, np.nan).astype(x.dtype, copy=False)
    from ._cupy_kernels import get_kernel

    lse = _lse_cupy(x, axis, acc)
    return get_kernel(kernel_name, T=x.dtype.name, A=acc.name)(x, lse)


def softmax(x, axis=-1):
    """Softmax along ``axis``: ``y_j = exp(x_j - lse)``, rows summing to 1.

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
