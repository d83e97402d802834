"""Shared fixtures: the backend (NumPy always, CuPy only with a GPU).  Helpers that test modules
import (tolerances, to_numpy) live in tests/helpers.py."""

import numpy as np
import pytest

from gpuce._backend import cupy_available

_HAS_GPU = cupy_available()


def pytest_collection_modifyitems(config, items):
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
