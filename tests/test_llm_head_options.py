"""The LLM-head options (softcap, return_stats) and check_labels=False, on NumPy and
(with a GPU, through the ``xp`` fixture) on CuPy's fused and portable paths, against the
float64 reference of tests/reference.py (softcap and the statistics written from their
definitions there)."""

import itertools
import math

import numpy as np
import pytest

import gpuce
import reference as R
from helpers import BFLOAT16, TOL, rng_for, to_numpy


def make_inputs(rng, shape, kind, dtype, ignore_frac=0.2):
    c = shape[-1]
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    if kind == "label":
        t = rng.integers(0, c, size=shape[:-1]).astype(np.int64)
        t[rng.random(shape[:-1]) < ignore_frac] = -100
    else:
        t = rng.random(shape)
        t = (t / t.sum(-1, keepdims=True)).astype(dtype)
    return x, t


def reference(x, t, kind, **kw):
    """The reference's (loss, grad, (z_loss, accuracy, lse, predicted)) shaped like gpuce's
    outputs."""
    kw.pop("check_labels", None)  # the reference never raises: a bad label is a NaN row
    c = x.shape[-1]
    lead = x.shape[:-1]
    x2 = np.asarray(x, np.float64).reshape(-1, c)
    t2 = t.reshape(-1) if kind == "label" else np.asarray(t, np.float64).reshape(-1, c)
    loss, grad, (z, acc, lse) = R.sce(x2, t2, kind=kind, stats=True, **kw)
    if kw.get("reduction") == "none":
        loss = loss.reshape(lead)
        z = z.reshape(lead)
        acc = None if acc is None else acc.reshape(lead)
    pred = R.predicted(x2, kw.get("softcap")).reshape(lead)
    return loss, grad.reshape(x.shape), (z, acc, lse.reshape(lead), pred)


def assert_stats(st, ref_st, kind, dtype, lead, reduction, xp):
    rtol, atol = TOL[np.dtype(dtype)]
    acc_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    z, acc, lse, pred = ref_st
    assert isinstance(st, gpuce.SceStats)
    shape = lead if reduction == "none" else ()
    for v in (st.z_loss, st.lse) + ((st.accuracy,) if kind == "label" else ()):
        assert type(v) is xp.ndarray and v.dtype == acc_dtype
    assert st.z_loss.shape == shape and st.lse.shape == lead
    np.testing.assert_allclose(to_numpy(st.z_loss), z, rtol=rtol, atol=atol * 10)
    np.testing.assert_allclose(to_numpy(st.lse), lse, rtol=rtol, atol=atol * 10)
    assert type(st.predicted) is xp.ndarray and st.predicted.dtype == np.int64
    np.testing.assert_array_equal(to_numpy(st.predicted), pred)
    if kind == "prob":
        assert st.accuracy is None
    else:
        assert st.accuracy.shape == shape
        np.testing.assert_allclose(to_numpy(st.accuracy), acc, rtol=1e-6, atol=0)


def run_check(xp, x, t, kind, dtype, *, weight=None, **kw):
    """gpuce with return_grad and return_stats against the reference; the caller's arrays
    are left as they were."""
    rtol, atol = TOL[np.dtype(dtype)]
    ref_loss, ref_grad, ref_st = reference(x, t, kind, weight=weight, **kw)
    x_dev, t_dev = xp.asarray(x), xp.asarray(t)
    w = None if weight is None else xp.asarray(weight)
    before = to_numpy(x_dev).copy(), to_numpy(t_dev).copy()
    loss, grad, st = gpuce.softmax_cross_entropy(x_dev, t_dev, weight=w, return_grad=True,
                                                 return_stats=True, **kw)
    np.testing.assert_array_equal(to_numpy(x_dev), before[0])
    np.testing.assert_array_equal(to_numpy(t_dev), before[1])
    assert grad.shape == x.shape and grad.dtype == x.dtype
    finite = ref_grad[np.isfinite(ref_grad)]
    scale = max(1.0, float(np.abs(finite).max()) if finite.size else 1.0)
    np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=rtol, atol=atol * 10)
    np.testing.assert_allclose(to_numpy(grad), ref_grad, rtol=rtol, atol=atol * scale)
    assert_stats(st, ref_st, kind, dtype, x.shape[:-1], kw.get("reduction", "mean"), xp)
    return loss, grad, st


# softcap 5 with logits of standard deviation 3: the cap bends every row, and tanh stays far
# from saturating (where float32 could tie two distinct float64 values)
OPTIONS = list(itertools.product(["mean", "sum", "none"], [False, True], [0.0, 0.1], [0.0, 1e-2],
                                 [None, 5.0]))


@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("reduction,weighted,smoothing,z,softcap", OPTIONS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_option(xp, kind, reduction, weighted, smoothing, z, softcap, dtype):
    rng = rng_for("every", kind, reduction, weighted, smoothing, z, softcap)
    x, t = make_inputs(rng, (37, 11), kind, dtype)
    weight = rng.random(11) + 0.5 if weighted else None
    run_check(xp, x, t, kind, dtype, weight=weight, reduction=reduction,
              label_smoothing=smoothing, z_loss=z, softcap=softcap)


@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_float16(xp, kind, softcap):
    x, t = make_inputs(rng_for("f16", kind, softcap), (64, 50), kind, np.float16)
    run_check(xp, x, t, kind, np.float16, reduction="mean", label_smoothing=0.05, z_loss=1e-3,
              softcap=softcap)


def adversarial_rows():
    """Rows (C = 4) with their labels: huge, tiny, ±inf, NaN, ties, and ignored ones."""
    inf, nan = math.inf, math.nan
    rows = [
        ([-1000.0, 1.0, 0.5, 0.0], 1),
        ([1e15, -1e15, 1.0, 0.0], 0),  # huge: saturates any softcap (z lse^2 fits float32)
        ([1e15, -1e15, 1.0, 0.0], 2),
        ([1e-30, -1e-30, 0.0, 1e-38], 3),  # tiny
        ([inf, 0.0, 1.0, 2.0], 0),  # +inf: NaN row without a cap, s with one
        ([-inf, 0.0, 1.0, 2.0], 3),
        ([-inf, -inf, -inf, -inf], 1),  # all -inf
        ([nan, 0.0, 1.0, 2.0], 2),  # NaN: a NaN row, never correct
        ([2.0, 2.0, 1.0, 0.0], 0),  # ties at the maximum count as correct
        ([2.0, 2.0, 1.0, 0.0], 1),
        ([2.0, 2.0, 3.0, 0.0], 1),
        ([5.0, 1.0, 1.0, 1.0], -100),  # ignored
        ([nan, nan, 1.0, 1.0], -100),  # ignored NaN row: loss 0, zero gradient, lse NaN
        ([0.0, 0.0, 0.0, 0.0], 3),
    ]
    return np.array([r for r, _ in rows]), np.array([k for _, k in rows], np.int64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("z", [0.0, 1e-2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adversarial_rows(xp, reduction, softcap, z, dtype):
    x, t = adversarial_rows()
    x = x.astype(dtype)
    loss, grad, st = run_check(xp, x, t, "label", dtype, reduction=reduction, softcap=softcap,
                               z_loss=z)
    acc = to_numpy(st.accuracy)
    if reduction == "none":
        # the rules spelled out: ties correct, NaN / +inf / all -inf rows wrong, ignored NaN
        # with a cap, +inf becomes s and an all -inf row a uniform finite one
        cap = 1 if softcap else 0
        expect = [1, 1, 0, 0, cap, 1, cap, 0, 1, 1, 0, math.nan, math.nan, 1]
        np.testing.assert_array_equal(acc, np.array(expect, float))
        assert np.isfinite(to_numpy(st.lse)[[0, 1, 2, 3, 5, 8, 11, 13]]).all()
    else:
        assert 0 < float(acc) < 1


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_softcap_saturates_with_a_finite_gradient(xp, dtype):
    """Logits far beyond the cap: tanh saturates, so the gradient of those logits goes to 0
    but stays finite (no inf * 0)."""
    rng = rng_for("saturate", np.dtype(dtype).name)
    big = 6e4 if dtype == np.float16 else 1e6
    x = (rng.standard_normal((16, 33)) * big).astype(dtype)
    t = rng.integers(0, 33, 16)
    loss, grad, st = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), softcap=30.0,
                                                 return_grad=True, return_stats=True)
    g = to_numpy(grad).astype(np.float64)
    assert np.isfinite(g).all() and np.isfinite(float(loss))
    saturated = np.abs(x.astype(np.float64)) > 30.0 * 20  # tanh = 1 to float64's precision
    assert saturated.sum() > 100 and np.all(g[saturated] == 0)
    assert np.all(np.abs(to_numpy(st.lse)) <= 30.0 + math.log(33) + 1e-5)
    if dtype != np.float16:
        run_check(xp, x, t, "label", dtype, softcap=30.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_check_labels_false_gives_nan_rows(xp, reduction, softcap):
    rng = rng_for("check_labels", reduction, softcap)
    x, t = make_inputs(rng, (20, 7), "label", np.float64)
    t[3], t[8], t[15] = 7, -1, 2**40  # out of range; ignore_index stays -100
    with pytest.raises(ValueError, match=r"label 7 at position \(3,\)"):
        gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), reduction=reduction,
                                    softcap=softcap)
    loss, grad, st = run_check(xp, x, t, "label", np.float64, reduction=reduction,
                               softcap=softcap, z_loss=1e-2, check_labels=False)
    g = to_numpy(grad)
    bad = np.zeros(20, bool)
    bad[[3, 8, 15]] = True
    assert np.isnan(g[bad]).all() and np.isfinite(g[~bad]).all()
    if reduction == "none":
        l = to_numpy(loss)
        assert np.isnan(l[bad]).all() and np.isfinite(l[~bad]).all()
        assert (to_numpy(st.accuracy)[bad] == 0).all()
    else:
        assert math.isnan(float(loss))


def test_check_labels_false_linear(xp):
    rng = rng_for("check_labels linear")
    X, W = rng.standard_normal((12, 3)), rng.standard_normal((5, 3))
    y = rng.integers(0, 5, 12)
    y[4] = 5
    with pytest.raises(ValueError, match="label 5 at position"):
        gpuce.linear_cross_entropy(xp.asarray(X), xp.asarray(W), xp.asarray(y))
    for reduction in ("none", "mean"):
        loss, grads = gpuce.linear_cross_entropy(xp.asarray(X), xp.asarray(W), xp.asarray(y),
                                                 reduction=reduction, return_grad=True,
                                                 check_labels=False, weight=xp.ones(5))
        l = to_numpy(loss)
        assert np.isnan(l[4]) and np.isfinite(np.delete(l, 4)).all() if reduction == "none" \
            else np.isnan(l)
        gx = to_numpy(grads.X)
        assert np.isnan(gx[4]).all() and np.isfinite(np.delete(gx, 4, axis=0)).all()


@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows(xp, kind, reduction):
    x = xp.zeros((0, 6), np.float32)
    t = xp.zeros(0, np.int64) if kind == "label" else xp.zeros((0, 6), np.float32)
    loss, grad, st = gpuce.softmax_cross_entropy(x, t, reduction=reduction, softcap=2.0,
                                                 return_grad=True, return_stats=True)
    assert grad.shape == (0, 6) and st.lse.shape == (0,) and st.lse.dtype == np.float32
    if reduction == "none":
        assert loss.shape == st.z_loss.shape == (0,)
    else:
        assert float(loss) == 0.0 and float(st.z_loss) == 0.0
    if kind == "prob":
        assert st.accuracy is None
    elif reduction == "none":
        assert st.accuracy.shape == (0,)
    else:
        assert math.isnan(float(st.accuracy))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(xp, reduction):
    x = rng_for("all ignored").standard_normal((5, 4))
    t = np.full(5, -100)
    loss, grad, st = run_check(xp, x, t, "label", np.float64, reduction=reduction, z_loss=0.1)
    assert (to_numpy(grad) == 0).all() and np.isfinite(to_numpy(st.lse)).all()
    if reduction != "none":
        assert float(loss) == 0.0 and float(st.z_loss) == 0.0 and math.isnan(float(st.accuracy))
    else:
        assert np.isnan(to_numpy(st.accuracy)).all() and (to_numpy(st.z_loss) == 0).all()


@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_z_loss_part_splits_the_loss(xp, kind, reduction):
    """loss - stats.z_loss is the loss computed with z_loss=0 (same denominator)."""
    rng = rng_for("split", kind, reduction)
    x, t = make_inputs(rng, (50, 9), kind, np.float64)
    w = xp.asarray(rng.random(9) + 0.5)
    loss, st = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), weight=w, z_loss=0.05,
                                           softcap=4.0, reduction=reduction, return_stats=True)
    plain = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), weight=w, softcap=4.0,
                                        reduction=reduction)
    assert float(st.z_loss) > 0.01
    np.testing.assert_allclose(float(loss) - float(st.z_loss), float(plain), rtol=1e-12)


def test_return_order(xp):
    x, t = make_inputs(rng_for("order"), (6, 5), "label", np.float32)
    x, t = xp.asarray(x), xp.asarray(t)
    loss = gpuce.softmax_cross_entropy(x, t)
    out = gpuce.softmax_cross_entropy(x, t, return_stats=True)
    assert len(out) == 2 and isinstance(out[1], gpuce.SceStats) and float(out[0]) == float(loss)
    out = gpuce.softmax_cross_entropy(x, t, return_stats=True, return_grad=True)
    assert len(out) == 3 and out[1].shape == x.shape and isinstance(out[2], gpuce.SceStats)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_inplace_with_softcap(xp, dtype):
    x, t = make_inputs(rng_for("inplace", np.dtype(dtype).name), (40, 13), "label", dtype)
    _, grad, st = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), softcap=2.5,
                                              return_grad=True, return_stats=True)
    buf = xp.asarray(x)
    _, out, st2 = gpuce.softmax_cross_entropy(buf, xp.asarray(t), softcap=2.5, return_grad=True,
                                              return_stats=True, inplace=True)
    assert out is buf
    np.testing.assert_array_equal(to_numpy(buf), to_numpy(grad))
    np.testing.assert_array_equal(to_numpy(st2.lse), to_numpy(st.lse))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["label", "prob"])
def test_walked_blocks(xp, monkeypatch, reduction, kind):
    """Logits without an (N, C) view are walked in row blocks: statistics assembled over the
    blocks equal the reference."""
    import gpuce._rows

    monkeypatch.setattr(gpuce._rows, "WALK_BLOCK_ELEMENTS_NUMPY", 64)
    monkeypatch.setattr(gpuce._rows, "WALK_BLOCK_ELEMENTS_CUPY", 64)
    rng = rng_for("walk", reduction, kind)
    x, t = make_inputs(rng, (9, 6, 7), kind, np.float64)
    xt = x.transpose(1, 0, 2)
    tt = t.transpose(1, 0) if kind == "label" else t.transpose(1, 0, 2)
    run_check(xp, xt, tt, kind, np.float64, reduction=reduction, softcap=3.0, z_loss=1e-2,
              label_smoothing=0.1)


# -- linear_cross_entropy -------------------------------------------------------------------

def linear_reference(X, W, b, y, kind, reg, **kw):
    f = X.astype(np.float64) @ W.astype(np.float64).T + (0 if b is None else b)
    loss, G, st = reference(f, y, kind, **kw)
    if kw["reduction"] != "none":
        loss = loss + 0.5 * reg * float((W.astype(np.float64) ** 2).sum())
    return loss, (G @ W, G.T @ X + reg * W, G.sum(0)), st


@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_linear_chunked_softcap_stats(xp, kind, reduction, dtype):
    rng = rng_for("linear", kind, reduction, np.dtype(dtype).name)
    n, d, c = 53, 8, 17
    X = (rng.standard_normal((n, d)) * 1.5).astype(dtype)
    W = rng.standard_normal((c, d)).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    _, y = make_inputs(rng, (n, c), kind, dtype)
    w = rng.random(c) + 0.5
    opts = dict(reduction=reduction, weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=4.0)
    ref_loss, ref_grads, ref_st = linear_reference(X, W, b, y, kind, 0.1, **opts)
    rtol, atol = TOL[np.dtype(dtype)]
    rtol, atol = rtol * 10, atol * 10  # X Wᵀ rounded in dtype
    results = []
    for chunk in (None, 7, 1):
        loss, grads, st = gpuce.linear_cross_entropy(
            xp.asarray(X), xp.asarray(W), xp.asarray(y), bias=xp.asarray(b), reg=0.1,
            chunk_size=chunk, return_grad=True, return_stats=True,
            **{**opts, "weight": xp.asarray(w)})
        np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=rtol, atol=atol)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(to_numpy(g), r, rtol=rtol, atol=atol * 10)
        if dtype == np.float64:  # float32: X Wᵀ rounded, compared at the loosened tolerance
            assert_stats(st, ref_st, kind, dtype, (n,), reduction, xp)
        np.testing.assert_allclose(to_numpy(st.lse), ref_st[2], rtol=rtol, atol=atol)
        results.append((to_numpy(loss), to_numpy(st.z_loss), st.accuracy))
    # chunked equals unchunked to rounding
    for loss, z, acc in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-5)
        np.testing.assert_allclose(z, results[0][1], rtol=1e-5)
        if kind == "label":
            np.testing.assert_array_equal(to_numpy(acc), to_numpy(results[0][2]))


# -- bad input ------------------------------------------------------------------------------

BAD_SOFTCAPS = [(0.0, ValueError), (-1.0, ValueError), (math.nan, ValueError),
                (math.inf, ValueError), (-math.inf, ValueError), (True, TypeError),
                ("30", TypeError), (np.array([1.0]), TypeError)]


@pytest.mark.parametrize("softcap,error", BAD_SOFTCAPS)
def test_bad_softcap(xp, softcap, error):
    x = xp.zeros((3, 4), np.float32)
    y = xp.zeros(3, np.int64)
    with pytest.raises(error, match="softcap"):
        gpuce.softmax_cross_entropy(x, y, softcap=softcap)
    with pytest.raises(error, match="softcap"):
        gpuce.linear_cross_entropy(xp.zeros((3, 2)), xp.zeros((4, 2)), y, softcap=softcap)


@pytest.mark.parametrize("name", ["return_stats", "check_labels"])
def test_bad_flags(xp, name):
    x, y = xp.zeros((3, 4), np.float32), xp.zeros(3, np.int64)
    with pytest.raises(TypeError, match=name):
        gpuce.softmax_cross_entropy(x, y, **{name: "yes"})
    with pytest.raises(TypeError, match=name):
        gpuce.linear_cross_entropy(xp.zeros((3, 2)), xp.zeros((4, 2)), y, **{name: 1})


# -- GPU: both paths agree with NumPy on the new options -----------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "portable"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_matches_numpy(impl, reduction):
    import cupy

    rng = rng_for("gpu", impl, reduction)
    x, t = make_inputs(rng, (3, 423, 301), "label", np.float32)
    t[0, 5] = 301
    opts = dict(reduction=reduction, softcap=30.0, z_loss=1e-3, label_smoothing=0.1,
                return_grad=True, return_stats=True, check_labels=False)
    ref = gpuce.softmax_cross_entropy(x * 10, t, **opts)
    got = gpuce.softmax_cross_entropy(cupy.asarray(x * 10), cupy.asarray(t), impl=impl, **opts)
    for r, g in zip(ref[:2], got[:2]):
        np.testing.assert_allclose(to_numpy(g), r, rtol=1e-4, atol=1e-6)
    for r, g in zip(ref[2], got[2]):
        np.testing.assert_allclose(to_numpy(g), r, rtol=1e-4, atol=1e-6)


# -- finite differences (float64): the chain rule through the cap, independently of the formulas

@pytest.mark.parametrize("kind", ["label", "prob"])
def test_softcap_gradient_by_finite_differences(xp, kind):
    rng = rng_for("fd", kind)
    x, t = make_inputs(rng, (6, 5), kind, np.float64, ignore_frac=0.2)
    w = xp.asarray(rng.random(5) + 0.5)
    opts = dict(weight=w, label_smoothing=0.1, z_loss=0.05, softcap=2.0, reduction="mean")
    t_dev = xp.asarray(t)
    _, grad = gpuce.softmax_cross_entropy(xp.asarray(x), t_dev, return_grad=True, **opts)
    h = 1e-6
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (float(gpuce.softmax_cross_entropy(xp.asarray(up), t_dev, **opts))
                   - float(gpuce.softmax_cross_entropy(xp.asarray(down), t_dev, **opts))) / (2 * h)
    assert np.abs(fd).max() > 1e-3
    np.testing.assert_allclose(to_numpy(grad), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, BFLOAT16])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_predicted_tokens_adversarial_rows(xp, dtype, softcap):
    """``stats.predicted``: ties go to the lowest index (softcap's saturation makes ties of
    its own: 40 and 50 both cap to 2.0 in every dtype), ±inf take part like any value, a NaN
    row gives -1, ignored rows are predicted too; the same in every reduction, through the
    block walk, the chunked linear model and dask."""
    x = np.array([[1.0, 3.0, 3.0, 0.0],
                  [np.nan, 9.0, 1.0, 0.0],
                  [-np.inf, -np.inf, -np.inf, -np.inf],
                  [5.0, 1.0, np.inf, 7.0],
                  [40.0, 50.0, 0.0, -1.0],
                  [0.5, -0.25, 0.75, 0.75]]).astype(dtype)
    t = np.array([1, 0, 2, -100, 1, 3])
    want = R.predicted(x, softcap)
    if softcap:
        assert want[4] == 0  # both saturate to the cap
    for reduction in ("mean", "sum", "none"):
        st = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), reduction=reduction,
                                         softcap=softcap, return_stats=True)[-1]
        np.testing.assert_array_equal(to_numpy(st.predicted), want)
    # walked: (3, 2, C) transposed, rows that do not merge
    xw = xp.asarray(x.reshape(2, 3, 4)).transpose(1, 0, 2)
    st = gpuce.softmax_cross_entropy(xw, xp.asarray(t.reshape(2, 3).T.copy()), softcap=softcap,
                                     return_stats=True)[-1]
    np.testing.assert_array_equal(to_numpy(st.predicted), want.reshape(2, 3).T)


def test_predicted_tokens_linear_and_dask(xp):
    rng = np.random.default_rng(5)
    X, W = rng.standard_normal((30, 6)), rng.standard_normal((9, 6))
    y = rng.integers(0, 9, 30)
    want = R.predicted(X @ W.T)
    _, st = gpuce.linear_cross_entropy(xp.asarray(X), xp.asarray(W), xp.asarray(y),
                                       return_stats=True, chunk_size=7)
    np.testing.assert_array_equal(to_numpy(st.predicted), want)
    if xp is np:
        da = pytest.importorskip("dask.array")
        for red in ("mean", "none"):
            _, st = gpuce.linear_cross_entropy(da.from_array(X, chunks=(8, 6)), W,
                                               da.from_array(y, chunks=8), return_stats=True,
                                               reduction=red)
            np.testing.assert_array_equal(st.predicted.compute(), want)
            _, st = gpuce.softmax_cross_entropy(da.from_array(X @ W.T, chunks=(8, 9)),
                                                da.from_array(y, chunks=8), return_stats=True,
                                                reduction=red)
            np.testing.assert_array_equal(st.predicted.compute(), want)
