"""Backend choice: array type in = array type out; imports without CuPy / without a GPU."""

import subprocess
import sys

import numpy as np
import pytest

import gpuce
from gpuce._backend import array_module


def test_numpy_in_numpy_out():
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    assert type(gpuce.softmax(x)) is np.ndarray
    loss, grad = gpuce.softmax_cross_entropy(x, np.array([0, 1, 2]), return_grad=True)
    assert isinstance(loss, np.ndarray) and type(grad) is np.ndarray


def test_lists_are_numpy():
    assert array_module([1.0, 2.0]) is np
    out = gpuce.softmax_cross_entropy(np.array([[1.0, 2.0]]), [1], reduction="none")
    assert type(out) is np.ndarray and out.shape == (1,)


def test_import_without_cupy():
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import gpuce, numpy as np\n"
        "print(float(gpuce.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1]))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert abs(float(out.stdout) - np.log(3)) < 1e-12


def test_import_does_not_import_cupy():
    code = "import sys, gpuce; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cupy_without_gpu_still_imports():
    pytest.importorskip("cupy")
    code = "import cupy, gpuce; from gpuce._backend import cupy_available; print(cupy_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ("True", "False")


def test_to_host():
    from gpuce._backend import to_host

    a = np.arange(3.0)
    assert to_host(a) is a
    np.testing.assert_array_equal(to_host([1, 2]), np.array([1, 2]))
    assert to_host(np.float32(2)).dtype == np.float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_all_finite_finds_every_nan_and_inf(xp, dtype):
    """all_finite (the linear model's check_finite; on CuPy one flag a row) against NumPy's
    isfinite, for a bad value in the first, a middle and the last row and column, 1-D and 2-D
    arrays, strided views, and the empty array."""
    from gpuce._backend import all_finite
    from tests.helpers import BFLOAT16

    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    base = np.random.default_rng(3).standard_normal((37, 21)).astype(dt)
    big = np.finfo(np.float16).max if dtype == "float16" else 1e30 if dtype != "float64" else 1e300
    base[5, 3] = big  # large but finite: no false alarm
    cases = [(base, True), (base[:0], True), (base[3], True), (base[:, ::2], True)]
    for bad in (np.nan, np.inf, -np.inf):
        for r, c in ((0, 0), (17, 11), (36, 20)):
            a = base.copy()
            a[r, c] = bad
            cases += [(a, False), (a[r], False), (a[:, ::-1], False)]
    for a, want in cases:
        assert bool(np.isfinite(a.astype(np.float64)).all()) == want  # the cases say what they mean
        assert all_finite(xp, xp.asarray(a)) is want, (a.shape, want)
