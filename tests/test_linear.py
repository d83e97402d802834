"""linear_cross_entropy: loss, dW, dX, db against the float64 reference and finite differences."""

import itertools
import zlib

import numpy as np
import pytest

import gpuce
import reference as R
from helpers import to_numpy


def ref_linear(X, W, y, bias, reg, kind, **kw):
    X64, W64 = np.asarray(X, np.float64), np.asarray(W, np.float64)
    f = X64 @ W64.T + (0 if bias is None else np.asarray(bias, np.float64))
    loss, G = R.sce(f, y, kind=kind, **kw)
    if kw.get("reduction") != "none":
        loss = loss + 0.5 * reg * float((W64 ** 2).sum())
    return loss, G.T @ X64 + reg * W64, G @ W64, G.sum(0)


def data(rng, n, d, c, kind, dtype):
    X = rng.standard_normal((n, d)).astype(dtype)
    W = (rng.standard_normal((c, d)) * 0.5).astype(dtype)
    if kind == "label":
        y = rng.integers(0, c, n)
        y[rng.random(n) < 0.15] = -100
    else:
        y = rng.random((n, c))
        y = (y / y.sum(1, keepdims=True)).astype(dtype)
    return X, W, y


@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("reduction,with_bias,weighted,smoothing,z",
                         list(itertools.product(["mean", "sum", "none"], [False, True], [False, True],
                                                [0.0, 0.1], [0.0, 1e-3])))
def test_against_reference(xp, kind, reduction, with_bias, weighted, smoothing, z):
    rng = np.random.default_rng(zlib.crc32(repr((kind, reduction, with_bias, weighted, smoothing, z)).encode()))
    X, W, y = data(rng, 29, 6, 5, kind, np.float64)
    b = rng.standard_normal(5) if with_bias else None
    w = rng.random(5) + 0.5 if weighted else None
    kw = dict(weight=w, label_smoothing=smoothing, z_loss=z, reduction=reduction)
    loss, g = gpuce.linear_cross_entropy(
        xp.asarray(X), xp.asarray(W), xp.asarray(y), bias=None if b is None else xp.asarray(b),
        reg=0.7, return_grad=True, **{**kw, "weight": None if w is None else xp.asarray(w)})
    rl, rdW, rdX, rdb = ref_linear(X, W, y, b, 0.7, kind, **kw)
    np.testing.assert_allclose(to_numpy(loss), rl, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(g.W), rdW, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(g.X), rdX, rtol=1e-10, atol=1e-12)
    if b is None:
        assert g.bias is None
    else:
        np.testing.assert_allclose(to_numpy(g.bias), rdb, rtol=1e-10, atol=1e-12)


def test_float32(xp):
    rng = np.random.default_rng(1)
    X, W, y = data(rng, 64, 17, 9, "label", np.float32)
    loss, g = gpuce.linear_cross_entropy(xp.asarray(X), xp.asarray(W), xp.asarray(y), reg=0.1,
                                         return_grad=True)
    rl, rdW, rdX, _ = ref_linear(X, W, y, None, 0.1, "label", reduction="mean")
    assert loss.dtype == np.float32 and g.W.dtype == np.float32
    np.testing.assert_allclose(to_numpy(loss), rl, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(g.W), rdW, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_numpy(g.X), rdX, rtol=1e-4, atol=1e-5)


def test_seed_total_loss_and_gradient():
    """reduction='sum' is the total loss L_total = Σ L_i + λ/2 ‖W‖², dW = (Ŷ − Y)ᵀX + λW."""
    rng = np.random.default_rng(2)
    X, W, y = data(rng, 12, 4, 3, "label", np.float64)
    y = np.abs(y) % 3
    f = X @ W.T
    Yhat = np.exp(f - f.max(1, keepdims=True))
    Yhat /= Yhat.sum(1, keepdims=True)
    Y = np.eye(3)[y]
    lam = 0.5
    total = sum(-f[i, y[i]] + np.log(np.exp(f[i]).sum()) for i in range(12)) + lam / 2 * (W ** 2).sum()
    loss, g = gpuce.linear_cross_entropy(X, W, y, reg=lam, reduction="sum", return_grad=True)
    assert float(loss) == pytest.approx(total, rel=1e-12)
    np.testing.assert_allclose(g.W, (Yhat - Y).T @ X + lam * W, rtol=1e-10)


@pytest.mark.parametrize("kind", ["label", "prob"])
def test_finite_differences(kind):
    rng = np.random.default_rng(3)
    X, W, y = data(rng, 8, 3, 4, kind, np.float64)
    b = rng.standard_normal(4)
    kw = dict(reg=0.3, reduction="mean", label_smoothing=0.1, z_loss=0.01, weight=rng.random(4) + 0.5)

    def f(X_, W_, b_):
        return float(gpuce.linear_cross_entropy(X_, W_, y, bias=b_, **kw))

    _, g = gpuce.linear_cross_entropy(X, W, y, bias=b, return_grad=True, **kw)
    h = 1e-6
    for arr, ga, pos in ((X, g.X, 0), (W, g.W, 1), (b, g.bias, 2)):
        fd = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            args_p, args_m = [X, W, b], [X, W, b]
            ap, am = arr.copy(), arr.copy()
            ap[idx] += h
            am[idx] -= h
            args_p[pos], args_m[pos] = ap, am
            fd[idx] = (f(*args_p) - f(*args_m)) / (2 * h)
        np.testing.assert_allclose(ga, fd, rtol=1e-6, atol=1e-8)


def test_input_grad_false_skips_dx(xp):
    rng = np.random.default_rng(4)
    X, W, y = data(rng, 10, 3, 4, "label", np.float64)
    _, g = gpuce.linear_cross_entropy(xp.asarray(X), xp.asarray(W), xp.asarray(y), return_grad=True,
                                      input_grad=False)
    assert g.X is None and g.W.shape == (4, 3)


def test_caller_arrays_untouched(xp):
    rng = np.random.default_rng(5)
    X, W, y = data(rng, 10, 3, 4, "label", np.float32)
    Xd, Wd = xp.asarray(X), xp.asarray(W)
    gpuce.linear_cross_entropy(Xd, Wd, xp.asarray(y), reg=1.0, return_grad=True)
    np.testing.assert_array_equal(to_numpy(Xd), X)
    np.testing.assert_array_equal(to_numpy(Wd), W)


# ---- bad input ----------------------------------------------------------------------------

def lce(xp, X, W, y, **kw):
    return gpuce.linear_cross_entropy(xp.asarray(X), xp.asarray(W), xp.asarray(y), **kw)


X0, W0, y0 = np.ones((4, 3)), np.ones((5, 3)), np.zeros(4, np.int64)


def test_feature_mismatch(xp):
    with pytest.raises(ValueError, match="features"):
        lce(xp, X0, np.ones((5, 2)), y0)


def test_label_length(xp):
    with pytest.raises(ValueError, match="rows"):
        lce(xp, X0, W0, np.zeros(3, np.int64))


def test_bias_length(xp):
    with pytest.raises(ValueError, match="bias must have shape"):
        lce(xp, X0, W0, y0, bias=xp.ones(4))


@pytest.mark.parametrize("reg", [-1.0, float("inf")])
def test_bad_reg(xp, reg):
    with pytest.raises(ValueError, match="reg"):
        lce(xp, X0, W0, y0, reg=reg)


@pytest.mark.parametrize("which", ["X", "W"])
def test_non_finite(xp, which):
    X, W = X0.copy(), W0.copy()
    (X if which == "X" else W)[1, 1] = np.nan
    with pytest.raises(ValueError, match=f"{which} contains NaN"):
        lce(xp, X, W, y0)


def test_dtype_mismatch_and_integers(xp):
    with pytest.raises(TypeError, match="same dtype"):
        lce(xp, X0.astype(np.float32), W0, y0)
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        lce(xp, X0.astype(np.int64), W0.astype(np.int64), y0)


def test_prob_target_width(xp):
    with pytest.raises(ValueError, match="probability targets"):
        lce(xp, X0, W0, np.ones((4, 4)) / 4)


def test_zero_weight_sum_mean_is_zero(xp):
    """As softmax_cross_entropy: a zero weight sum over the non-ignored rows gives a mean
    of 0 (only the penalty remains) and gradients of the penalty alone."""
    rng = np.random.default_rng(zlib.crc32(b"linear zero weight sum"))
    X, W, _ = data(rng, 9, 4, 5, "label", np.float64)
    y = np.array([1, 3, -100, 1, 3, 1, 3, -100, 1])
    w = np.array([1.0, 0.0, 2.0, 0.0, 1.0])
    for chunk in (2, None):
        loss, g = gpuce.linear_cross_entropy(xp.asarray(X), xp.asarray(W), xp.asarray(y),
                                             weight=xp.asarray(w), reg=0.3, label_smoothing=0.1,
                                             return_grad=True, chunk_size=chunk)
        rl, rdW, rdX, _ = ref_linear(X, W, y, None, 0.3, "label", weight=w, label_smoothing=0.1)
        np.testing.assert_allclose(to_numpy(loss), rl, rtol=1e-12)
        np.testing.assert_allclose(to_numpy(loss), 0.15 * (W ** 2).sum(), rtol=1e-12)
        np.testing.assert_allclose(to_numpy(g.W), 0.3 * W, rtol=1e-12)
        assert not to_numpy(g.X).any()
