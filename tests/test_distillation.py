"""gpuce.distillation_loss and gpuce.linear_distillation_loss on NumPy, CuPy (both GPU paths,
with a GPU) and dask, against float64 references written here from the definitions (the
gradient by central differences of the reference, and through the softmax Jacobian)."""

import math

import numpy as np
import pytest

import gpuce
from helpers import rng_for, to_numpy

IGNORE = -100


def cap_fn(f, cap):
    return cap * np.tanh(f / cap) if cap else f


def log_softmax(u):
    m = u.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return u - m - np.log(np.exp(u - m).sum(axis=1, keepdims=True))


def plogp(p, a, b):
    return np.where(p > 0, p * np.where(p > 0, a - b, 0.0), 0.0).sum(axis=1)


def ref_rows(S, T, beta, tau=1.0, cap=None):
    """float64 loss per row from the definitions."""
    lq = log_softmax(cap_fn(np.asarray(S, np.float64), cap) / tau)
    lp = log_softmax(cap_fn(np.asarray(T, np.float64), cap) / tau)
    q, p = np.exp(lq), np.exp(lp)
    if beta == 0:
        return plogp(p, lp, lq)
    if beta == 1:
        return plogp(q, lq, lp)
    m = beta * p + (1 - beta) * q
    with np.errstate(divide="ignore"):
        lm = np.log(m)
    return beta * plogp(p, lp, lm) + (1 - beta) * plogp(q, lq, lm)


def ref_grad(S, T, beta, tau=1.0, cap=None, g=None):
    """∂(Σ g_i L_i)/∂S through the softmax Jacobian: dL/dq first, then J_q = diag(q) − q qᵀ."""
    S = np.asarray(S, np.float64)
    lq = log_softmax(cap_fn(S, cap) / tau)
    lp = log_softmax(cap_fn(np.asarray(T, np.float64), cap) / tau)
    q, p = np.exp(lq), np.exp(lp)
    if beta == 0:
        dq = -np.where(p > 0, p / np.where(q > 0, q, 1.0), 0.0)  # d/dq of −Σ p log q
    elif beta == 1:
        dq = lq - lp + 1.0
    else:
        m = beta * p + (1 - beta) * q
        dq = (1 - beta) * (lq - np.log(m))  # d/dq of (1−β) Σ q log q − Σ M log M (+ consts)
    du = q * dq - q * (q * dq).sum(axis=1, keepdims=True)
    if g is not None:
        du = du * g[:, None]
    ds = du / tau
    return ds * (1 - np.tanh(S / cap) ** 2) if cap else ds


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_float64_against_reference(xp, beta, tau, cap, reduction):
    rng = rng_for("distill", beta, tau, cap, reduction)
    n, c = 13, 37
    S, T = rng.normal(size=(n, c)) * 3, rng.normal(size=(n, c)) * 3
    y = rng.integers(0, c, n)
    y[[2, 7]] = IGNORE
    loss, grad = gpuce.distillation_loss(xp.asarray(S), xp.asarray(T), xp.asarray(y), beta=beta,
                                         temperature=tau, softcap=cap, reduction=reduction,
                                         return_grad=True)
    loss, grad = to_numpy(loss), to_numpy(grad)
    rows = ref_rows(S, T, beta, tau, cap)
    rows[[2, 7]] = 0
    count = n - 2
    want = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / count}[reduction]
    np.testing.assert_allclose(loss, want, rtol=1e-12, atol=1e-14)
    g = np.ones(n) / (count if reduction == "mean" else 1)
    g[[2, 7]] = 0
    np.testing.assert_allclose(grad, ref_grad(S, T, beta, tau, cap, g), rtol=1e-10, atol=1e-14)
    assert loss.dtype == np.float64 and grad.dtype == np.float64


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_no_target_leading_dims_and_row_scale(beta):
    rng = rng_for("distill-lead", beta)
    S, T = rng.normal(size=(2, 3, 9)), rng.normal(size=(2, 3, 9))
    loss = gpuce.distillation_loss(S, T, beta=beta)
    rows = ref_rows(S.reshape(6, 9), T.reshape(6, 9), beta)
    np.testing.assert_allclose(loss, rows.mean(), rtol=1e-12)
    g = rng.normal(size=(2, 3))
    lr, grad = gpuce.distillation_loss(S, T, beta=beta, reduction="none", return_grad=True,
                                       grad_row_scale=g)
    assert lr.shape == (2, 3) and grad.shape == S.shape
    np.testing.assert_allclose(grad.reshape(6, 9),
                               ref_grad(S.reshape(6, 9), T.reshape(6, 9), beta, g=g.ravel()),
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
def test_student_equals_teacher_gives_zero(xp, beta):
    rng = rng_for("distill-same", beta)
    S = rng.normal(size=(6, 50)) * 5
    loss, grad = gpuce.distillation_loss(xp.asarray(S), xp.asarray(S.copy()), beta=beta,
                                         temperature=1.7, softcap=20.0, return_grad=True)
    assert abs(float(to_numpy(loss))) <= 1e-15
    assert np.abs(to_numpy(grad)).max() <= 1e-16


def test_extreme_and_non_finite_rows():
    inf, nan = np.inf, np.nan
    S = np.array([[1e4, -1e4, 0.0, 3.0], [0.0, -inf, 1.0, 2.0], [nan, 0.0, 0.0, 0.0],
                  [0.0, 0.0, 0.0, 0.0], [-inf, -inf, -inf, -inf], [5.0, 1.0, 0.0, 0.0]])
    T = np.array([[-1e4, 1e4, 0.0, 3.0], [0.0, 1.0, -inf, 2.0], [0.0, 0.0, 0.0, 0.0],
                  [0.0, inf, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [nan, nan, nan, nan]])
    y = np.array([0, 1, 2, 3, 0, IGNORE])
    for beta in (0.0, 0.5, 1.0):
        loss, grad = gpuce.distillation_loss(S, T, y, beta=beta, reduction="none",
                                             return_grad=True)
        assert np.isfinite(loss[0]) and np.isfinite(grad[0]).all()  # ±1e4: finite
        assert np.isnan(loss[2:5]).all() and np.isnan(grad[2:5]).all()  # NaN, +inf, all −inf
        assert loss[5] == 0 and (grad[5] == 0).all()  # ignored, whatever it holds
        want = ref_rows(S[:2], T[:2], beta)
        np.testing.assert_allclose(loss[:2], want, rtol=1e-12)
    # row 1: the student excludes class 1 (−inf) where the teacher has mass, the teacher class
    # 2 where the student has mass: both KLs are +inf, the JSD finite (M > 0 wherever either
    # has mass)
    for beta, finite in ((0.0, False), (0.5, True), (1.0, False)):
        loss = gpuce.distillation_loss(S[1:2], T[1:2], beta=beta)
        assert np.isfinite(loss) == finite and (finite or loss == np.inf)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_16_and_32_bit_against_float64_of_the_same_values(xp, dtype, beta):
    import ml_dtypes  # noqa: F401

    rng = rng_for("distill-dtype", dtype, beta)
    S = (rng.normal(size=(20, 131)) * 3).astype(dtype)
    T = (rng.normal(size=(20, 131)) * 3).astype(dtype)
    loss, grad = gpuce.distillation_loss(xp.asarray(S), xp.asarray(T), beta=beta,
                                         reduction="none", return_grad=True, temperature=1.5)
    loss, grad = to_numpy(loss), to_numpy(grad)
    assert loss.dtype == np.float32 and grad.dtype == S.dtype
    S64, T64 = S.astype(np.float64), T.astype(np.float64)
    np.testing.assert_allclose(loss, ref_rows(S64, T64, beta, 1.5), rtol=1e-4, atol=2e-6)
    unit = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}[dtype]
    want = ref_grad(S64, T64, beta, 1.5)
    # one rounding of the float32 gradient (half a unit, relative), plus float32's own error
    # (cancellation in p_S − p_T: about 1e-7 of the row's largest probability)
    assert (np.abs(grad.astype(np.float64) - want) <= unit * np.abs(want) + 2e-7).all()


def test_sparse_teacher_against_dense_support():
    rng = rng_for("distill-sparse")
    n, c, k = 9, 40, 6
    S, T = rng.normal(size=(n, c)) * 2, rng.normal(size=(n, c)) * 2
    lp_full = log_softmax(T)
    idx = np.argsort(-T, axis=1)[:, :k]
    lp = np.take_along_axis(lp_full, idx, axis=1)
    lp[3, -1] = -np.inf  # a padding entry adds nothing
    y = rng.integers(0, c, n)
    y[4] = IGNORE
    loss, grad = gpuce.distillation_loss(S, (idx, lp), y, reduction="none", temperature=2.0,
                                         return_grad=True)
    lq = log_softmax(S / 2.0)
    p = np.exp(lp)
    want = plogp(p, lp, np.take_along_axis(lq, idx, axis=1))
    want[4] = 0
    np.testing.assert_allclose(loss, want, rtol=1e-12, atol=1e-15)
    # gradient: the dense forward KL's with p_T restricted to the support (no renormalisation)
    pt = np.zeros((n, c))
    np.put_along_axis(pt, idx, p, axis=1)
    q = np.exp(lq)
    g = (q * pt.sum(axis=1, keepdims=True) - pt) / 2.0
    g[4] = 0
    np.testing.assert_allclose(grad, g, rtol=1e-12, atol=1e-15)
    # the full support with exact log-probabilities is the dense forward KL
    idx_all = np.tile(np.arange(c), (n, 1))
    dense = gpuce.distillation_loss(S, T, reduction="none")
    sparse = gpuce.distillation_loss(S, (idx_all, lp_full), reduction="none")
    np.testing.assert_allclose(sparse, dense, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad, err, match", [
    (dict(beta=-0.1), ValueError, "beta"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(grad_row_scale=np.ones(4)), ValueError, "grad_row_scale"),
])
def test_bad_arguments(bad, err, match):
    S = np.zeros((4, 5))
    with pytest.raises(err, match=match):
        gpuce.distillation_loss(S, S, **bad)


def test_bad_inputs():
    S = np.zeros((4, 5))
    with pytest.raises(ValueError, match="same shape"):
        gpuce.distillation_loss(S, np.zeros((4, 6)))
    with pytest.raises(ValueError, match=r"label 5 at position \(1,\)"):
        gpuce.distillation_loss(S, S, np.array([0, 5, 1, 1]))
    with pytest.raises(TypeError, match="target"):
        gpuce.distillation_loss(S, S, np.zeros(4))
    idx = np.array([[0, 1]] * 4)
    lp = np.full((4, 2), -1.0)
    with pytest.raises(ValueError, match="beta = 0"):
        gpuce.distillation_loss(S, (idx, lp), beta=0.5)
    with pytest.raises(ValueError, match="distinct"):
        gpuce.distillation_loss(S, (np.array([[0, 0]] * 4), lp))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        gpuce.distillation_loss(S, (np.array([[0, 7]] * 4), lp))
    with pytest.raises(ValueError, match="<= 0"):
        gpuce.distillation_loss(S, (idx, -lp))
    with pytest.raises(TypeError, match="student_logits"):
        gpuce.distillation_loss(np.zeros((4, 5), int), S)


def test_n_zero_and_all_ignored():
    S = np.zeros((0, 5))
    loss, grad = gpuce.distillation_loss(S, S, return_grad=True)
    assert float(loss) == 0 and grad.shape == (0, 5)
    S = np.random.default_rng(0).normal(size=(3, 5))
    loss, grad = gpuce.distillation_loss(S, S[::-1].copy(), np.full(3, IGNORE), return_grad=True)
    assert float(loss) == 0 and (grad == 0).all()


# -- the linear form ---------------------------------------------------------------------------

def linear_problem(rng, n=11, ds=4, dt=6, c=23):
    return (rng.normal(size=(n, ds)), rng.normal(size=(c, ds)), rng.normal(size=(n, dt)),
            rng.normal(size=(c, dt)), rng.normal(size=c), rng.normal(size=c))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_linear_against_reference(xp, beta, chunk_size):
    rng = rng_for("distill-linear", beta, chunk_size)
    Xs, Ws, Xt, Wt, bs, bt = linear_problem(rng)
    y = rng.integers(0, 23, 11)
    y[5] = IGNORE
    loss, g = gpuce.linear_distillation_loss(
        *(xp.asarray(a) for a in (Xs, Ws, Xt, Wt, y)), bias_student=xp.asarray(bs),
        bias_teacher=xp.asarray(bt), beta=beta, temperature=1.3, softcap=6.0,
        chunk_size=chunk_size, return_grad=True)
    S, T = Xs @ Ws.T + bs, Xt @ Wt.T + bt
    rows = ref_rows(S, T, beta, 1.3, 6.0)
    rows[5] = 0
    np.testing.assert_allclose(to_numpy(loss), rows.sum() / 10, rtol=1e-12)
    w = np.full(11, 0.1)
    w[5] = 0
    G = ref_grad(S, T, beta, 1.3, 6.0, w)
    np.testing.assert_allclose(to_numpy(g.X), G @ Ws, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(to_numpy(g.W), G.T @ Xs, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(to_numpy(g.bias), G.sum(0), rtol=1e-9, atol=1e-14)


def test_linear_finite_differences():
    rng = rng_for("distill-fd")
    Xs, Ws, Xt, Wt, bs, bt = linear_problem(rng, n=4, ds=3, dt=2, c=6)

    def f(Xs, Ws, bs):
        return float(gpuce.linear_distillation_loss(Xs, Ws, Xt, Wt, bias_student=bs,
                                                    bias_teacher=bt, beta=0.4, temperature=0.8,
                                                    reduction="sum"))

    _, g = gpuce.linear_distillation_loss(Xs, Ws, Xt, Wt, bias_student=bs, bias_teacher=bt,
                                          beta=0.4, temperature=0.8, reduction="sum",
                                          return_grad=True, chunk_size=3)
    h = 1e-6
    for name, a, ga in (("X", Xs, g.X), ("W", Ws, g.W), ("b", bs, g.bias)):
        num = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            args = {"Xs": Xs, "Ws": Ws, "bs": bs}
            key = {"X": "Xs", "W": "Ws", "b": "bs"}[name]
            plus, minus = a.copy(), a.copy()
            plus[idx] += h
            minus[idx] -= h
            args[key] = plus
            fp = f(**args)
            args[key] = minus
            num[idx] = (fp - f(**args)) / (2 * h)
        np.testing.assert_allclose(ga, num, rtol=1e-6, atol=1e-8, err_msg=name)


def test_linear_bfloat16_student_float32_teacher():
    import ml_dtypes

    rng = rng_for("distill-linear-bf16")
    Xs, Ws, Xt, Wt, _, _ = linear_problem(rng, n=16, ds=8, dt=8, c=64)
    Xs, Ws = Xs.astype(ml_dtypes.bfloat16), Ws.astype(ml_dtypes.bfloat16)
    Xt, Wt = Xt.astype(np.float32), Wt.astype(np.float32)
    loss, g = gpuce.linear_distillation_loss(Xs, Ws, Xt, Wt, return_grad=True, chunk_size=5)
    assert loss.dtype == np.float32 and g.W.dtype == Ws.dtype and g.X.dtype == Xs.dtype
    S = Xs.astype(np.float64) @ Ws.astype(np.float64).T
    T = Xt.astype(np.float64) @ Wt.astype(np.float64).T
    np.testing.assert_allclose(loss, ref_rows(S, T, 0.0).mean(), rtol=1e-5)


def test_linear_errors():
    rng = rng_for("distill-linear-errors")
    Xs, Ws, Xt, Wt, _, _ = linear_problem(rng)
    with pytest.raises(ValueError, match="same rows and classes"):
        gpuce.linear_distillation_loss(Xs, Ws, Xt, Wt[:5])
    with pytest.raises(ValueError, match="features"):
        gpuce.linear_distillation_loss(Xs, Ws, Xt, Ws)
    with pytest.raises(ValueError, match="NaN or infinity"):
        gpuce.linear_distillation_loss(Xs, Ws, np.full_like(Xt, np.nan), Wt)


# -- dask --------------------------------------------------------------------------------------

def test_dask_rows_equal_numpy():
    da = pytest.importorskip("dask.array")
    import dask

    rng = rng_for("distill-dask")
    S, T = rng.normal(size=(20, 9)), rng.normal(size=(20, 9))
    y = rng.integers(0, 9, 20)
    y[[1, 13]] = IGNORE
    for red in ("none", "sum", "mean"):
        want = gpuce.distillation_loss(S, T, y, beta=0.5, reduction=red, return_grad=True)
        got = dask.compute(*gpuce.distillation_loss(da.from_array(S, chunks=(7, 9)), T, y,
                                                    beta=0.5, reduction=red, return_grad=True))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-13)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-13, atol=1e-16)
    Xs, Ws, Xt, Wt, bs, bt = linear_problem(rng, n=20)
    y = rng.integers(0, 23, 20)
    want = gpuce.linear_distillation_loss(Xs, Ws, Xt, Wt, y, bias_student=bs, bias_teacher=bt,
                                          return_grad=True, chunk_size=4)
    got = dask.compute(*gpuce.linear_distillation_loss(
        da.from_array(Xs, chunks=(6, 4)), Ws, da.from_array(Xt, chunks=(6, 6)), Wt, y,
        bias_student=bs, bias_teacher=bt, return_grad=True, chunk_size=4))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-13)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="chunked along the classes axis"):
        gpuce.distillation_loss(da.from_array(S, chunks=(7, 3)), T)
