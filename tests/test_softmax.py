"""softmax / log_softmax / logsumexp against the float64 per-row reference."""

import numpy as np
import pytest
import scipy.special as sp

import gpuce
import reference as R
from helpers import TOL, to_numpy


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((17, 33), -1), ((9, 7, 41), 1), ((5, 6), 0), ((8,), 0)])
def test_against_reference(xp, dtype, shape, axis):
    rng = np.random.default_rng(len(shape) * 100 + axis)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    xm = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    flat = xm.reshape(-1, xm.shape[-1])
    lse_ref = np.array([R.lse_row(r) for r in flat]).reshape(xm.shape[:-1])
    sm_ref = np.moveaxis(R.softmax_rows(flat).reshape(xm.shape), -1, axis)
    lsm_ref = np.moveaxis((flat - np.array([R.lse_row(r) for r in flat])[:, None]).reshape(xm.shape), -1, axis)
    rtol, atol = TOL[np.dtype(dtype)]
    xd = xp.asarray(x)
    for fn, ref in [(gpuce.logsumexp, lse_ref), (gpuce.softmax, sm_ref), (gpuce.log_softmax, lsm_ref)]:
        out = fn(xd, axis=axis)
        assert type(out) is type(xd) and out.dtype == dtype
        tol_scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(to_numpy(out).astype(np.float64), ref, rtol=rtol,
                                   atol=atol * tol_scale)


def test_adversarial_rows(xp):
    x = np.array([[-1000.0, 1.0], [1e4, -1e4], [-np.inf, 0.0], [-np.inf, -np.inf],
                  [np.inf, 0.0], [np.nan, 1.0], [709.0, 710.0]])
    lse = to_numpy(gpuce.logsumexp(xp.asarray(x)))
    np.testing.assert_allclose(lse, sp.logsumexp(x, axis=1), rtol=1e-14)
    sm = to_numpy(gpuce.softmax(xp.asarray(x)))
    np.testing.assert_allclose(sm[:3], sp.softmax(x[:3], axis=1), rtol=1e-14, atol=1e-300)
    with np.errstate(all="ignore"):
        np.testing.assert_allclose(sm[3:6], sp.softmax(x[3:6], axis=1))  # scipy: NaN rows
    assert np.isnan(sm[3:6]).all()
    assert np.isnan(to_numpy(gpuce.log_softmax(xp.asarray(x)))[3:6]).all()
    np.testing.assert_allclose(sm[6], sp.softmax(x[6]), rtol=1e-12)


def test_shift_invariance_and_rows_sum_to_one(xp):
    x = np.random.default_rng(1).standard_normal((50, 30))
    a = to_numpy(gpuce.softmax(xp.asarray(x)))
    b = to_numpy(gpuce.softmax(xp.asarray(x + 123.0)))
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(a.sum(1), 1.0, rtol=1e-14)


def test_empty(xp):
    assert gpuce.softmax(xp.zeros((0, 4), np.float32)).shape == (0, 4)
    assert gpuce.logsumexp(xp.zeros((0, 4), np.float32)).shape == (0,)
    out = to_numpy(gpuce.logsumexp(xp.zeros((3, 0), np.float64)))
    assert out.shape == (3,) and np.isneginf(out).all()


def test_input_not_modified(xp):
    x = xp.asarray(np.random.default_rng(2).standard_normal((4, 5)).astype(np.float32))
    before = to_numpy(x).copy()
    gpuce.softmax(x), gpuce.log_softmax(x), gpuce.logsumexp(x)
    np.testing.assert_array_equal(to_numpy(x), before)


def test_float32_keeps_relative_precision_for_large_logits(xp):
    """exp((x - m) - log s): no 1e-4 error from rounding lse ~ 1e4 to float32."""
    x = np.array([[1e4, 1e4 - 1, -1e4], [-5e3, -5e3 - 2, -5e3 - 0.5]], np.float32)
    ref = R.softmax_rows(x)
    np.testing.assert_allclose(to_numpy(gpuce.softmax(xp.asarray(x))), ref, rtol=2e-6)
    np.testing.assert_allclose(to_numpy(gpuce.log_softmax(xp.asarray(x)))[:, :2],
                               np.log(ref[:, :2]), rtol=2e-6)
    _, g = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray([0, 2]), reduction="sum",
                                       return_grad=True)
    expect = ref.copy()
    expect[[0, 1], [0, 2]] -= 1
    np.testing.assert_allclose(to_numpy(g), expect, rtol=2e-6, atol=1e-7)
