"""entropy, cross_entropy, kl_div against scipy-style float64 references."""

import math

import numpy as np
import pytest
import scipy.special as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gpuce
from helpers import to_numpy


def ref_rows(fn, p, q=None):
    out = []
    for i in range(p.shape[0]):
        s = 0.0
        for j in range(p.shape[1]):
            s += fn(float(p[i, j]), None if q is None else float(q[i, j]))
        out.append(s)
    return np.array(out)


def h_term(p, _):
    return 0.0 if p == 0 else -p * math.log(p)


def ce_term(p, q):
    if p == 0:
        return 0.0
    return math.inf if q == 0 else -p * math.log(q)


def kl_term(p, q):
    if p == 0:
        return 0.0
    return math.inf if q == 0 else p * math.log(p / q)


def dist(rng, shape, zeros=True):
    p = rng.random(shape)
    if zeros:
        p[rng.random(shape) < 0.2] = 0
    p[:, 0] += 1e-3
    return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_against_reference(xp, dtype):
    rng = np.random.default_rng(4)
    p, q = dist(rng, (20, 9)).astype(dtype), dist(rng, (20, 9)).astype(dtype)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    P, Q = xp.asarray(p), xp.asarray(q)
    np.testing.assert_allclose(to_numpy(gpuce.entropy(P)), ref_rows(h_term, p), rtol=rtol)
    np.testing.assert_allclose(to_numpy(gpuce.cross_entropy(P, Q)), ref_rows(ce_term, p, q), rtol=rtol)
    np.testing.assert_allclose(to_numpy(gpuce.kl_div(P, Q)), ref_rows(kl_term, p, q), rtol=rtol)
    np.testing.assert_allclose(to_numpy(gpuce.kl_div(P, Q)), sp.rel_entr(p, q).sum(-1), rtol=rtol)


def test_conventions(xp):
    p = xp.asarray(np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]))
    q = xp.asarray(np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]))
    np.testing.assert_allclose(to_numpy(gpuce.entropy(p)), [0.0, math.log(2), 0.0])
    ce = to_numpy(gpuce.cross_entropy(p, q))
    assert ce[0] == 0.0 and np.isposinf(ce[1]) and ce[2] == pytest.approx(math.log(2))
    kl = to_numpy(gpuce.kl_div(p, q))
    assert kl[0] == 0.0 and np.isposinf(kl[1]) and kl[2] == pytest.approx(math.log(2))


def test_axis(xp):
    rng = np.random.default_rng(8)
    p = dist(rng, (6, 5)).T.copy()  # distributions along axis 0
    q = dist(rng, (6, 5)).T.copy()
    np.testing.assert_allclose(to_numpy(gpuce.kl_div(xp.asarray(p), xp.asarray(q), axis=0)),
                               sp.rel_entr(p, q).sum(0), rtol=1e-12)


probs = hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 10)),
                   elements=st.floats(0, 1)).filter(lambda a: (a.sum(-1) > 0).all())


@settings(max_examples=80, deadline=None)
@given(p=probs, data=st.data())
def test_decomposition_holds(p, data):
    q = data.draw(hnp.arrays(np.float64, p.shape, elements=st.floats(1e-6, 1)))
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    np.testing.assert_allclose(gpuce.cross_entropy(p, q), gpuce.entropy(p) + gpuce.kl_div(p, q),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_propagates_as_scipy(xp, dtype):
    """A NaN in p or q gives a NaN row, as scipy.special.entr / rel_entr (not -inf / +inf)."""
    nan = np.nan
    p = np.array([[nan, 0.5, 0.5], [0.0, 0.5, 0.5], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5],
                  [0.0, 1.0, 0.0]], dtype)
    q = np.array([[0.2, 0.3, 0.5], [nan, 0.5, 0.5], [0.5, nan, 0.5], [0.2, 0.3, 0.5],
                  [0.0, 1.0, 0.0]], dtype)
    p64, q64 = p.astype(np.float64), q.astype(np.float64)
    h_ref = sp.entr(p64).sum(-1)
    kl_ref = sp.rel_entr(p64, q64).sum(-1)
    ce_ref = h_ref + kl_ref  # H(P,Q) = H(P) + KL(P||Q)
    assert np.isnan(h_ref[0]) and np.isnan(kl_ref[:3]).all()  # the reference itself says NaN
    P, Q = xp.asarray(p), xp.asarray(q)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(to_numpy(gpuce.entropy(P)), h_ref, rtol=rtol)
    np.testing.assert_allclose(to_numpy(gpuce.kl_div(P, Q)), kl_ref, rtol=rtol)
    np.testing.assert_allclose(to_numpy(gpuce.cross_entropy(P, Q)), ce_ref, rtol=rtol)
    # with q's NaN where p = 0, scipy still says NaN (rel_entr(0, nan) = nan)
    assert np.isnan(to_numpy(gpuce.cross_entropy(P, Q))[1])
    assert np.isnan(to_numpy(gpuce.entropy(P))[0]) and not np.isnan(to_numpy(gpuce.entropy(P))[1:]).any()
