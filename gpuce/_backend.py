"""The one backend chooser: NumPy or CuPy, decided by the array types passed in.

CuPy is never imported here; a CuPy array is recognised by looking its class up
in ``sys.modules`` (the array-api-compat trick), so ``import gpuce`` works with
no CuPy installed and with CuPy but no GPU.
"""

from __future__ import annotations

import sys

import numpy as np


def is_cupy_array(x) -> bool:
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(x, cp.ndarray)


# Python and NumPy scalars name no device: they go with whatever the arrays are on (a
# scalar where an array belongs then fails validation with a ValueError on either backend).
_SCALARS = (bool, int, float, complex, np.generic)


def array_module(*arrays):
    """Return ``numpy`` or ``cupy`` for the given arrays (``None`` entries and scalars skipped).

    Raises
    ------
    TypeError
        If NumPy (or other host) arrays are mixed with CuPy arrays.
    """
    on_gpu, on_host = [], []
    for a in arrays:
        if a is None or isinstance(a, _SCALARS):
            continue
        (on_gpu if is_cupy_array(a) else on_host).append(a)
    if on_gpu and on_host:
        raise TypeError(
            "cannot mix CuPy and NumPy arrays: got cupy.ndarray together with "
            f"{type(on_host[0]).__module__}.{type(on_host[0]).__name__}; move both to the same device "
            "(cupy.asarray / cupy.asnumpy)"
        )
    if on_gpu:
        return sys.modules["cupy"]
    return np


def asarray(xp, a):
    """``a`` as an array of module ``xp`` (lists and scalars become NumPy arrays)."""
    if a is None:
        return None
    if xp is np:
        return np.asarray(a)
    if isinstance(a, _SCALARS):
        return xp.asarray(a)
    return a


def to_host(a):
    """A NumPy copy of a CuPy array (one device-to-host copy); anything else as a NumPy array."""
    return a.get() if is_cupy_array(a) else np.asarray(a)


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def is_dask_array(x) -> bool:
    """True for a dask array (looked up in ``sys.modules``: dask is never imported here)."""
    da = sys.modules.get("dask.array")
    return da is not None and isinstance(x, da.Array)
