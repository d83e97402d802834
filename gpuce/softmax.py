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

from ._backend import array_module, asarray
from ._dask import map_rows
from ._dispatch import backends
from ._rows import softmax_rows
from ._validation import check_axis, check_float


def _prepare(x, axis):
    xp = array_module(x)
    x = asarray(xp, x)
    check_float(x, "x")
    axis = check_axis(axis, x.ndim)
    return xp, x, axis


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
    return softmax_rows(xp, x, axis, "lse")


def _map(x, axis, mode, kernel_name):
    xp, x, axis = _prepare(x, axis)
    return softmax_rows(xp, x, axis, mode, kernel_name)


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
