"""Shared fixtures: the backend (NumPy always, CuPy only with a GPU).  Helpers that test modules
import (tolerances, to_numpy) live in tests/helpers.py."""

import os
import zlib

import numpy as np
import pytest

from gpuce._backend import cupy_available

_HAS_GPU = cupy_available()


def _shard(items, config):
    """GPUCE_TEST_SHARD="i/k" keeps the i-th of k fixed shares of the tests (by a CRC of each
    test id: the same split on every machine), so that a GPU suite too long for one device call
    runs in k calls; unset: every test."""
    spec = os.environ.get("GPUCE_TEST_SHARD", "")
    if not spec:
        return items
    try:
        i, k = (int(v) for v in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"GPUCE_TEST_SHARD must be i/k, got {spec!r}") from None
    if not 1 <= i <= k:
        raise pytest.UsageError(f"GPUCE_TEST_SHARD {spec!r}: need 1 <= i <= k")
    keep = [it for it in items if zlib.crc32(it.nodeid.encode()) % k == i - 1]
    config.hook.pytest_deselected(items=[it for it in items if zlib.crc32(it.nodeid.encode()) % k != i - 1])
    return keep


def pytest_collection_modifyitems(config, items):
    items[:] = _shard(items, config)
    if _HAS_GPU:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible to CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["numpy", pytest.param("cupy-portable", marks=pytest.mark.gpu),
                        pytest.param("cupy-fused", marks=pytest.mark.gpu)])
def xp(request):
    """The array module of a test.  On the GPU every test runs twice: with the portable
    ElementwiseKernel/ReductionKernel path and with the fused RawKernels (impl="auto"
    is pointed at each in turn by gpuce.use_impl)."""
    if request.param == "numpy":
        yield np
        return
    import cupy

    import gpuce

    with gpuce.use_impl(request.param.split("-")[1]):
        yield cupy
