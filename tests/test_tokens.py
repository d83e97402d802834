"""gpuce.token_logprobs and gpuce.linear_token_logprobs on NumPy, CuPy (both GPU paths, with a
GPU) and dask against a float64
reference written here from the definitions: u = cap(f) / τ, log p = u_k − logsumexp(u),
H = −Σ q log q with q = softmax(u), and the gradient of Σ g_l log p + g_H H by the chain rule
through the softmax's Jacobian (a different route from the implementation's closed form)."""

import math

import numpy as np
import pytest

import gpuce
from helpers import rng_for, to_numpy

IGNORE = -100


def ref_rows(f, k, tau=1.0, cap=None, gl=None, gh=None, ignore=IGNORE):
    """float64 log p, H and (with gl/gh) the gradient, row by row, from the definitions."""
    f = np.asarray(f, np.float64)
    n, c = f.shape
    logp, ent, grad = np.zeros(n), np.zeros(n), np.zeros((n, c))
    for i in range(n):
        if k[i] == ignore:
            continue
        v = cap * np.tanh(f[i] / cap) if cap else f[i].copy()
        u = v / tau
        m = u.max()
        if not np.isfinite(m):
            logp[i] = ent[i] = np.nan
            grad[i] = np.nan
            continue
        w = np.exp(u - m)
        lse = m + math.log(w.sum())
        q = w / w.sum()
        logq = u - lse
        qlogq = np.where(q > 0, q * np.where(q > 0, logq, 0.0), 0.0)
        logp[i] = u[k[i]] - lse
        ent[i] = -qlogq.sum()
        # d log p / du = e_k − q;  dH/du = J^T (−(log q + 1)) with J = diag(q) − q qᵀ
        d_logp = -q.copy()
        d_logp[k[i]] += 1.0
        dh_dq = -(np.where(q > 0, logq, 0.0) + 1.0)
        d_ent = q * dh_dq - q * (q @ dh_dq)
        du = (0.0 if gl is None else gl[i]) * d_logp + (0.0 if gh is None else gh[i]) * d_ent
        dv = du / tau
        grad[i] = dv * (1.0 - np.tanh(f[i] / cap) ** 2) if cap else dv
    return logp, ent, grad


def rows(rng, n, c, scale=3.0):
    return rng.normal(size=(n, c)) * scale, rng.integers(0, c, n)


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("cap", [None, 4.0])
@pytest.mark.parametrize("c", [1, 2, 37, 300])
def test_float64_against_reference(xp, tau, cap, c):
    rng = rng_for("tokens", tau, cap, c)
    f, k = rows(rng, 23, c)
    k[[3, 11]] = IGNORE
    gl, gh = rng.normal(size=23), rng.normal(size=23)
    out = gpuce.token_logprobs(xp.asarray(f), xp.asarray(k), temperature=tau, softcap=cap,
                               return_entropy=True, return_grad=True,
                               grad_logprobs=xp.asarray(gl), grad_entropy=xp.asarray(gh))
    logp, ent, grad = (to_numpy(a) for a in out)
    rl, re, rg = ref_rows(f, k, tau, cap, gl, gh)
    assert logp.dtype == ent.dtype == grad.dtype == np.float64
    np.testing.assert_allclose(logp, rl, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ent, re, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, rg, rtol=1e-11, atol=1e-12)
    assert (logp[[3, 11]] == 0).all() and (ent[[3, 11]] == 0).all() and (grad[[3, 11]] == 0).all()
    assert (logp <= 1e-12).all()  # a log-probability
    assert (ent >= -1e-12).all() and (ent <= math.log(c) + 1e-12).all()


def test_outputs_by_flags_and_leading_dims():
    rng = rng_for("tokens-lead")
    f = rng.normal(size=(2, 3, 11))
    k = rng.integers(0, 11, (2, 3))
    lp = gpuce.token_logprobs(f, k)
    assert lp.shape == (2, 3)
    lp2, ent = gpuce.token_logprobs(f, k, return_entropy=True)
    assert ent.shape == (2, 3)
    gl = np.ones((2, 3))
    lp3, g = gpuce.token_logprobs(f, k, return_grad=True, grad_logprobs=gl)
    assert g.shape == f.shape
    rl, re, rg = ref_rows(f.reshape(6, 11), k.ravel(), gl=gl.ravel())
    for a in (lp, lp2, lp3):
        np.testing.assert_allclose(a.ravel(), rl, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(ent.ravel(), re, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(g.reshape(6, 11), rg, rtol=1e-12, atol=1e-13)
    # return_grad without incoming gradients: the gradient of 0
    _, g0 = gpuce.token_logprobs(f, k, return_grad=True)
    assert (g0 == 0).all()


def test_adversarial_rows(xp):
    inf, nan = np.inf, np.nan
    f = np.array([
        [1e4, -1e4, 0.0, 5.0],     # huge: q one-hot, H = 0, finite
        [1e-30, 0.0, -1e-30, 0.0],  # tiny: uniform, H = log 4
        [0.0, -inf, 1.0, -inf],    # -inf entries: q = 0 there, finite H and gradient
        [-inf, -inf, -inf, -inf],  # all -inf: NaN
        [0.0, inf, 1.0, 2.0],      # +inf: NaN
        [0.0, nan, 1.0, 2.0],      # NaN: NaN
        [2.0, 2.0, 2.0, 2.0],      # ties: uniform
        [nan, nan, nan, nan],      # ignored, whatever the values
        [0.0, -inf, 1.0, 3.0],     # the label at -inf: log p = -inf, finite gradient
    ])
    k = np.array([0, 1, 2, 0, 1, 2, 3, IGNORE, 1])
    gl, gh = np.full(9, 0.7), np.full(9, -0.4)
    out = gpuce.token_logprobs(xp.asarray(f), xp.asarray(k), return_entropy=True,
                               return_grad=True, grad_logprobs=xp.asarray(gl),
                               grad_entropy=xp.asarray(gh))
    logp, ent, grad = (to_numpy(a) for a in out)
    rl, re, rg = ref_rows(f, k, gl=gl, gh=gh)
    np.testing.assert_allclose(logp, rl, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(ent, re, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad, rg, rtol=1e-12, atol=1e-15)
    assert ent[0] == 0 and logp[0] == 0
    assert abs(ent[1] - math.log(4)) < 1e-15 and abs(ent[6] - math.log(4)) < 1e-15
    assert np.isfinite(ent[2]) and np.isfinite(grad[2]).all() and grad[2, 1] == grad[2, 3] == 0
    assert np.isnan(logp[3:6]).all() and np.isnan(ent[3:6]).all() and np.isnan(grad[3:6]).all()
    assert logp[7] == ent[7] == 0 and (grad[7] == 0).all()
    assert logp[8] == -inf and np.isfinite(ent[8]) and np.isfinite(grad[8]).all()


def test_n_zero_and_all_ignored():
    for lead in [(0,), (3, 0)]:
        f = np.zeros(lead + (5,), np.float32)
        lp, ent, g = gpuce.token_logprobs(f, np.zeros(lead, np.int64), return_entropy=True,
                                          return_grad=True)
        assert lp.shape == ent.shape == lead and g.shape == f.shape and lp.dtype == np.float32
    f = np.random.default_rng(0).normal(size=(4, 6))
    lp, g = gpuce.token_logprobs(f, np.full(4, 7), ignore_index=7, return_grad=True,
                                 grad_logprobs=np.ones(4))
    assert (lp == 0).all() and (g == 0).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_16_and_32_bit_against_float64_of_the_same_values(xp, dtype):
    import ml_dtypes  # noqa: F401 (bfloat16's dtype)

    rng = rng_for("tokens-dtype", dtype)
    f, k = rows(rng, 40, 129, scale=4.0)
    k[5] = IGNORE
    f = f.astype(dtype)
    gl, gh = rng.normal(size=40), rng.normal(size=40)
    out = gpuce.token_logprobs(xp.asarray(f), xp.asarray(k), temperature=0.8,
                               return_entropy=True, return_grad=True,
                               grad_logprobs=xp.asarray(gl), grad_entropy=xp.asarray(gh))
    logp, ent, grad = (to_numpy(a) for a in out)
    assert logp.dtype == ent.dtype == np.float32 and grad.dtype == f.dtype
    rl, re, rg = ref_rows(f.astype(np.float64), k, 0.8, None, gl.astype(np.float32),
                          gh.astype(np.float32))
    # float32 accumulation over 129 classes of values up to ~20: a few ulps of 32
    np.testing.assert_allclose(logp, rl, rtol=0, atol=2e-5)
    np.testing.assert_allclose(ent, re, rtol=0, atol=2e-5)
    # the gradient rounded once to the output dtype: within one rounding (half an ulp) plus
    # the float32 error
    unit = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}[dtype]
    err = np.abs(grad.astype(np.float64) - rg)
    assert (err <= unit * np.abs(rg) + 1e-6).all(), err.max()


def test_inputs_not_modified():
    rng = rng_for("tokens-keep")
    f, k = rows(rng, 5, 9)
    f0, k0 = f.copy(), k.copy()
    gpuce.token_logprobs(f, k, softcap=3.0, return_grad=True, grad_logprobs=np.ones(5))
    assert (f == f0).all() and (k == k0).all()


@pytest.mark.parametrize("bad, err, match", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(return_entropy=1), TypeError, "return_entropy"),
    (dict(grad_logprobs=np.ones(4)), ValueError, "return_grad"),
    (dict(return_grad=True, grad_logprobs=np.ones(3)), ValueError, "grad_logprobs"),
])
def test_bad_arguments(bad, err, match):
    f = np.zeros((4, 5))
    with pytest.raises(err, match=match):
        gpuce.token_logprobs(f, np.zeros(4, np.int64), **bad)


def test_bad_targets(xp):
    f = xp.zeros((4, 5))
    with pytest.raises(ValueError, match=r"label 5 at position \(2,\)"):
        gpuce.token_logprobs(f, xp.asarray([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="label -1"):
        gpuce.token_logprobs(f, xp.asarray([0, -1, 1, 2]))
    f = np.zeros((4, 5))
    with pytest.raises(TypeError, match="integer"):
        gpuce.token_logprobs(f, np.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        gpuce.token_logprobs(f, np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="logits"):
        gpuce.token_logprobs(np.zeros((4, 5), np.int64), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="label"):
        gpuce.token_logprobs(f, np.array([0, 1, 2, 2**64 - 1], np.uint64))


# -- the linear form --------------------------------------------------------------------------

def linear_problem(rng, n=17, d=6, c=41):
    X = rng.normal(size=(n, d))
    W = rng.normal(size=(c, d)) * 0.7
    b = rng.normal(size=c)
    k = rng.integers(0, c, n)
    k[[2, n // 2 + 1]] = IGNORE
    return X, W, b, k


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 17])
@pytest.mark.parametrize("cap", [None, 2.5])
def test_linear_against_reference(xp, chunk_size, cap):
    rng = rng_for("tokens-linear", chunk_size, cap)
    X, W, b, k = linear_problem(rng)
    gl, gh = rng.normal(size=17), rng.normal(size=17)
    logp, ent, grads = gpuce.linear_token_logprobs(
        *(xp.asarray(a) for a in (X, W, k)), bias=xp.asarray(b), temperature=1.3, softcap=cap,
        return_entropy=True, return_grad=True, grad_logprobs=xp.asarray(gl),
        grad_entropy=xp.asarray(gh), chunk_size=chunk_size)
    logp, ent = to_numpy(logp), to_numpy(ent)
    grads = type(grads)(*(to_numpy(a) for a in grads))
    rl, re, rg = ref_rows(X @ W.T + b, k, 1.3, cap, gl, gh)
    np.testing.assert_allclose(logp, rl, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ent, re, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads.X, rg @ W, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(grads.W, rg.T @ X, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(grads.bias, rg.sum(0), rtol=1e-11, atol=1e-12)


def test_linear_finite_differences():
    rng = rng_for("tokens-fd")
    X, W, b, k = linear_problem(rng, n=5, d=3, c=7)
    gl, gh = rng.normal(size=5), rng.normal(size=5)

    def objective(X, W, b):
        lp, h = gpuce.linear_token_logprobs(X, W, k, bias=b, temperature=0.7, softcap=3.0,
                                            return_entropy=True)
        return float(gl @ lp + gh @ h)

    _, _, g = gpuce.linear_token_logprobs(X, W, k, bias=b, temperature=0.7, softcap=3.0,
                                          return_entropy=True, return_grad=True,
                                          grad_logprobs=gl, grad_entropy=gh, chunk_size=2)
    h = 1e-6
    for name, a, ga in (("X", X, g.X), ("W", W, g.W), ("b", b, g.bias)):
        num = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus, minus = a.copy(), a.copy()
            plus[idx] += h
            minus[idx] -= h
            args = {"X": X, "W": W, "b": b}
            args[name] = plus
            fp = objective(**args)
            args[name] = minus
            num[idx] = (fp - objective(**args)) / (2 * h)
        np.testing.assert_allclose(ga, num, rtol=1e-6, atol=1e-7, err_msg=name)


def test_linear_input_grad_false_and_no_bias():
    rng = rng_for("tokens-linear-flags")
    X, W, _, k = linear_problem(rng)
    lp, g = gpuce.linear_token_logprobs(X, W, k, return_grad=True, input_grad=False,
                                        grad_logprobs=np.ones(17))
    assert g.X is None and g.bias is None
    _, _, rg = ref_rows(X @ W.T, k, gl=np.ones(17))
    np.testing.assert_allclose(g.W, rg.T @ X, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_linear_16_bit(xp, dtype):
    import ml_dtypes  # noqa: F401

    rng = rng_for("tokens-linear-16", dtype)
    X, W, b, k = linear_problem(rng, n=33, d=16, c=300)
    X, W, b = (a.astype(dtype) for a in (X, W, b))
    gl = np.ones(33)
    lp, ent, g = gpuce.linear_token_logprobs(
        *(xp.asarray(a) for a in (X, W, k)), bias=xp.asarray(b), return_entropy=True,
        return_grad=True, grad_logprobs=xp.asarray(gl), chunk_size=8)
    lp, ent = to_numpy(lp), to_numpy(ent)
    g = type(g)(*(to_numpy(a) for a in g))
    assert lp.dtype == ent.dtype == np.float32
    assert g.X.dtype == g.W.dtype == g.bias.dtype == X.dtype
    X64, W64, b64 = (a.astype(np.float64) for a in (X, W, b))
    rl, re, rg = ref_rows(X64 @ W64.T + b64, k, gl=gl)
    # float32 logits (16-bit GEMM inputs, float32 accumulation): float32 rounding only
    np.testing.assert_allclose(lp, rl, rtol=0, atol=5e-5)
    np.testing.assert_allclose(ent, re, rtol=0, atol=5e-5)
    unit = {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]
    dW = rg.T @ X64  # the driver rounds G to 16 bits for the GEMMs: a relative unit a term
    scale = np.abs(rg).T @ np.abs(X64)
    assert (np.abs(g.W.astype(np.float64) - dW) <= 2 * unit * scale + 1e-5).all()


def test_linear_bad_input():
    X, W = np.zeros((4, 3)), np.zeros((5, 3))
    with pytest.raises(ValueError, match="target must be"):
        gpuce.linear_token_logprobs(X, W, np.zeros((4, 5), np.int64))
    with pytest.raises(ValueError, match="features"):
        gpuce.linear_token_logprobs(X, np.zeros((5, 2)), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="temperature"):
        gpuce.linear_token_logprobs(X, W, np.zeros(4, np.int64), temperature=0)
    with pytest.raises(ValueError, match="NaN or infinity"):
        gpuce.linear_token_logprobs(np.full((4, 3), np.nan), W, np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="label 5"):
        gpuce.linear_token_logprobs(X, W, np.array([0, 5, 1, 1]))
    with pytest.raises(TypeError, match="chunk_size"):
        gpuce.linear_token_logprobs(X, W, np.zeros(4, np.int64), chunk_size=1.5)


# -- dask ----------------------------------------------------------------------------------------

def test_dask_row_chunks_equal_numpy():
    da = pytest.importorskip("dask.array")
    import dask

    rng = rng_for("tokens-dask")
    f = rng.normal(size=(10, 3, 7)) * 3
    k = rng.integers(0, 7, (10, 3))
    k[2, 1] = IGNORE
    gl, gh = rng.normal(size=(10, 3)), rng.normal(size=(10, 3))
    opts = dict(temperature=1.3, softcap=5.0, return_entropy=True, return_grad=True,
                grad_logprobs=gl, grad_entropy=gh)
    ref = gpuce.token_logprobs(f, k, **opts)
    out = gpuce.token_logprobs(da.from_array(f, chunks=(4, 3, 7)), k, **opts)
    assert all(isinstance(o, da.Array) for o in out)
    for a, b in zip(ref, dask.compute(*out)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="chunked along the classes axis"):
        gpuce.token_logprobs(da.from_array(f, chunks=(4, 3, 3)), k)
    bad = k.copy()
    bad[7, 2] = 9
    with pytest.raises(ValueError, match=r"label 9 at position \(7, 2\)"):
        dask.compute(gpuce.token_logprobs(da.from_array(f, chunks=(4, 3, 7)), bad))


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_dask_linear_equal_numpy(dtype):
    da = pytest.importorskip("dask.array")
    import dask
    import ml_dtypes  # noqa: F401

    rng = rng_for("tokens-dask-linear", dtype)
    X, W, b, k = linear_problem(rng)
    X, W, b = (a.astype(dtype) for a in (X, W, b))
    gl = rng.normal(size=17)
    opts = dict(bias=b, return_entropy=True, return_grad=True, grad_logprobs=gl, chunk_size=4)
    lp, ent, g = gpuce.linear_token_logprobs(X, W, k, **opts)
    out = gpuce.linear_token_logprobs(da.from_array(X, chunks=(6, 6)), W, k, **opts)
    dlp, dent, dg = dask.compute(*out)
    np.testing.assert_array_equal(lp, dlp)
    np.testing.assert_array_equal(ent, dent)
    np.testing.assert_array_equal(g.X, dg.X)
    assert dg.W.dtype == W.dtype and dg.bias.dtype == W.dtype
    if dtype == "float64":  # blocks sum dW in another order: rounding only
        np.testing.assert_allclose(g.W, dg.W, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(g.bias, dg.bias, rtol=1e-13, atol=1e-14)
    else:  # float32 sums rounded once to bfloat16: at most one bfloat16 unit apart
        diff = np.abs(g.W.astype(np.float64) - dg.W.astype(np.float64))
        assert (diff <= 2.0**-7 * np.abs(g.W.astype(np.float64)) + 1e-6).all()
