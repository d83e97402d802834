"""The one backend chooser: NumPy or CuPy, decided by the array types passed in, and the
small backend-specific helpers that need only an array's metadata or module (conversion to
the host or to a backend, a loss accumulator, free device memory, memory overlap).

A CuPy array is recognised by looking its class up in ``sys.modules`` (the
array-api-compat trick), so choosing a backend never imports CuPy and ``import gpuce``
works with no CuPy installed and with CuPy but no GPU; only :func:`gpu_available` imports
it, and the CuPy helpers import the kernels lazily.
"""

from __future__ import annotations

import math
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
    """``a`` as an array of module ``xp`` (lists and scalars become NumPy arrays).  A NumPy
    array in non-native byte order (``x.astype(">f8")`` on a little-endian machine) becomes a
    native-order copy: the backends and the kernels read native values only."""
    if a is None:
        return None
    if xp is np:
        a = np.asarray(a)
        if not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        return a
    if isinstance(a, _SCALARS):
        return xp.asarray(a)
    return a


def to_host(a):
    """A NumPy copy of a CuPy array (one device-to-host copy); anything else as a NumPy array."""
    return a.get() if is_cupy_array(a) else np.asarray(a)


def to_backend(xp, a):
    """``a`` as an array of module ``xp``, copied across devices where needed: a NumPy
    array (a CuPy one copied to the host) for NumPy, ``cupy.asarray(a)`` for CuPy."""
    if xp is np:
        return to_host(a)
    return xp.asarray(a)


def float64_accumulator(xp):
    """A float64 zero to add a loop's losses into: the Python float 0.0 on NumPy, a 0-d
    float64 device array on CuPy (adding a device loss to it needs no host sync)."""
    if xp is np:
        return 0.0
    return xp.zeros((), np.float64)


def free_memory_bytes(xp) -> float:
    """Free memory of the current device, counting the blocks CuPy's pool holds unused;
    ``math.inf`` on NumPy (host memory is not bounded here)."""
    if xp is np:
        return math.inf
    free, _ = xp.cuda.runtime.memGetInfo()
    return int(free) + int(xp.get_default_memory_pool().free_bytes())


def shares_memory(xp, a, b) -> bool:
    """True if arrays ``a`` and ``b`` (same module) may have an element in common, from the
    arrays' metadata alone (no data is read, nothing is allocated).

    NumPy: ``numpy.shares_memory`` (exact; an undecidable case within its work bound counts
    as shared).  CuPy: the arrays' address ranges overlap.  ``cupy.shares_memory`` is not
    used: its exact form builds an int64 array of every element's address on the device
    (8 bytes an element of the logits).  Interleaved views of one buffer (``x[:, ::2]``
    and ``x[:, 1::2]``) therefore count as shared on CuPy.
    """
    if a is None or b is None or a.size == 0 or b.size == 0:
        return False
    if xp is np:
        if not np.may_share_memory(a, b):
            return False
        try:
            return bool(np.shares_memory(a, b, max_work=1 << 20))
        except np.exceptions.TooHardError:
            return True
    lo_a, hi_a = _address_range(a)
    lo_b, hi_b = _address_range(b)
    return lo_a < hi_b and lo_b < hi_a


def all_finite(xp, a) -> bool:
    """Whether every element of the float array ``a`` is finite (one host read on CuPy).

    CuPy: the ``gpuce_finite_rows`` ReductionKernel gives one bool a row (the last axis), so
    the temporary is a byte a row, not ``xp.isfinite(a)``'s byte an element (for an LLM
    head's W of 256000 x 2304, 590 MB held by CuPy's pool after the call).  NumPy:
    ``np.isfinite(a).all()``."""
    if a.size == 0:
        return True
    if xp is np:
        return bool(np.isfinite(a).all())
    from ._cuda.kernels import ACC_OF, get_kernel

    flags = get_kernel("gpuce_finite_rows", T=a.dtype.name, A=ACC_OF[a.dtype.name])(a, axis=-1)
    return bool(flags.all())


def _address_range(arr):
    """[first, last + itemsize) byte addresses of a CuPy array's elements."""
    lo = hi = arr.data.ptr
    for size, stride in zip(arr.shape, arr.strides):
        ext = (size - 1) * stride
        lo, hi = (lo + ext, hi) if ext < 0 else (lo, hi + ext)
    return lo, hi + arr.itemsize


def shares_buffer(xp, view, base) -> bool:
    """True if ``view`` (a reshape of ``base``) writes through to ``base``."""
    if xp is np:
        return np.may_share_memory(view, base)
    return view.size == 0 or view.data.ptr == base.data.ptr


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
