"""The CUDA device helpers (kernels/gpuce_rowstat.cuh) built for the host and checked against
the float64 reference: the maths the GPU kernels run, tested without a GPU.

The merge order (sequential, tree) and the fused kernels' max-then-sums order are all driven
here; only the parallel structure of the kernels (shuffles, barriers) is left to the GPU suite.
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import reference as R
from gpuce._cuda import source

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    so = tmp_path_factory.mktemp("host") / "rowstat_host.so"
    header = source.kernel_dir() / "gpuce_rowstat.cuh"
    subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", f'-DGPUCE_ROWSTAT="{header}"',
                    str(HERE / "host" / "rowstat_host.cpp"), "-o", str(so)], check=True)
    return ctypes.CDLL(str(so))


def run(lib, x, t, kind, w, eps, z, ign, scale, method, dtype):
    n, c = x.shape
    fn = lib.rows_f64 if dtype == np.float64 else lib.rows_f32
    ct = ctypes.c_double if dtype == np.float64 else ctypes.c_float
    x = np.ascontiguousarray(x, dtype)
    w = np.ascontiguousarray(w, dtype)
    lbl = np.ascontiguousarray(t if kind == "label" else np.zeros(n), np.int64)
    y = np.ascontiguousarray(t if kind == "prob" else np.zeros((n, c)), dtype)
    loss, lse, grad = np.empty(n, dtype), np.empty(n, dtype), np.empty((n, c), dtype)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    fn.restype = None
    fn(p(x), ctypes.c_longlong(n), ctypes.c_int(c), ctypes.c_int(0 if kind == "label" else 1), p(lbl), p(y),
       p(w), ct(eps), ct(z), ctypes.c_longlong(ign), ct(scale), ctypes.c_int(method), p(loss), p(lse), p(grad))
    return loss, lse, grad


ADVERSARIAL = np.array([
    [-1000.0, 1.0, 0.0, 2.0], [1e4, -1e4, 0.0, 1e4 - 1], [3.0, 3.0, 3.0, 3.0], [-np.inf, 2.0, 1.0, 0.0],
    [88.0, 89.0, 90.0, 87.0], [np.nan, 0.0, 1.0, 2.0], [np.inf, 0.0, 1.0, 2.0], [-np.inf] * 4,
])


@pytest.mark.parametrize("method", [0, 1, 2], ids=["sequential", "tree", "fused"])
@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("eps,z,weighted", [(0.0, 0.0, False), (0.1, 1e-3, True)])
def test_helpers_against_reference(lib, method, kind, dtype, eps, z, weighted):
    rng = np.random.default_rng(method * 10 + weighted)
    x = np.vstack([rng.standard_normal((40, 4)) * 4, ADVERSARIAL])
    n, c = x.shape
    if kind == "label":
        t = rng.integers(0, c, n)
        t[::7] = -100
    else:
        t = rng.random((n, c))
        t /= t.sum(1, keepdims=True)
    w = rng.random(c) + 0.5 if weighted else np.ones(c)
    ref_loss, ref_grad = R.sce(x, t, kind=kind, weight=w, label_smoothing=eps, z_loss=z, reduction="none")
    loss, lse, grad = run(lib, x, t, kind, w, eps, z, -100, 1.0, method, dtype)
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    with np.errstate(all="ignore"):
        np.testing.assert_allclose(loss, ref_loss, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=rtol)
        active = (t != -100) if kind == "label" else np.ones(n, bool)
        good = active & ~np.array([R.bad_row(r) for r in x])
        np.testing.assert_allclose(lse[good], [R.lse_row(r) for r in x[good]], rtol=rtol)


def test_merge_order_changes_nothing_beyond_rounding(lib):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((50, 300)) * 10
    t = rng.integers(0, 300, 50)
    w = np.ones(300)
    outs = [run(lib, x, t, "label", w, 0.1, 0.0, -100, 1.0, m, np.float32) for m in (0, 1, 2)]
    for o in outs[1:]:
        np.testing.assert_allclose(o[0], outs[0][0], rtol=1e-5)
        np.testing.assert_allclose(o[2], outs[0][2], rtol=1e-5, atol=1e-7)
