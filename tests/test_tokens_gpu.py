"""The fused token kernels on a GPU (gpuce._cuda.tokens.token_rows) against a float64 NumPy
reference written here: every logits dtype, int32 and int64 labels, log p and H, the gradient
(of the logits' dtype, of the accumulation dtype, in place), temperature, softcap, ignored
and non-finite rows, strided rows.  Skipped without a GPU."""

import zlib

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

IGNORE = -100
DTYPES = ["float16", "bfloat16", "float32", "float64"]
ACC = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float32, "float64": np.float64}
# relative tolerances of log p / H (accumulation dtype) and of the gradient (its own dtype)
TOL = {"float16": 1e-3, "bfloat16": 2.0**-8, "float32": 5e-5, "float64": 1e-10}


def _np_dtype(name):
    from gpuce._validation import bfloat16_dtype

    return bfloat16_dtype() if name == "bfloat16" else np.dtype(name)


def _inputs(dtype, n, c, seed, ldx=None):
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    ldx = ldx or c
    store = (rng.standard_normal((n, ldx)) * 3).astype(_np_dtype(dtype))
    x = store[:, :c]
    lab = rng.integers(0, c, n)
    lab[::7] = IGNORE
    x[1, c // 2] = np.nan  # a NaN row
    x[2, :] = -np.inf  # every entry -inf: a NaN row
    x[3, 0] = -np.inf  # an -inf entry
    x[4, :] = 1.0  # ties
    x[7, :] = np.nan  # ignored (row 7), whatever it holds
    gl = rng.standard_normal(n) + 1.0
    gh = rng.standard_normal(n) * 0.5
    return store, x, lab, gl, gh


def _reference(x, lab, tau, cap, gl, gh):
    """Float64 log p, H and the gradient of Σ gl log p + gh H (the module's formulas)."""
    f = x.astype(np.float64)
    n, c = f.shape
    with np.errstate(all="ignore"):
        v = cap * np.tanh(f / cap) if cap else f
        u = v / tau
        m = u.max(axis=1)
        bad = ~np.isfinite(m)
        d = u - np.where(bad, 0.0, m)[:, None]
        e = np.exp(d)
        s = e.sum(axis=1)
        logs = np.log(s)
        active = lab != IGNORE
        k = np.where(active, lab, 0)
        logp = d[np.arange(n), k] - logs
        ent = logs - np.where(e > 0, e * d, 0.0).sum(axis=1) / s
        q = e / s[:, None]
        term = np.where(q > 0, q * (d - logs[:, None] + ent[:, None]), 0.0)
        onehot = np.zeros((n, c))
        onehot[np.arange(n), k] = 1.0
        grad = (gl[:, None] * (onehot - q) - gh[:, None] * term) / tau
        if cap:
            grad *= 1.0 - np.tanh(f / cap) ** 2
    for a in (logp, ent, grad):
        a[bad] = np.nan
        a[~active] = 0.0
    return logp, ent, grad


def _compare(got, want, rtol, what):
    got = np.asarray(got, np.float64)
    nan = np.isnan(want)
    assert np.isnan(got[nan]).all(), what
    scale = max(1.0, float(np.abs(want[~nan]).max(initial=0.0)))
    np.testing.assert_allclose(got[~nan], want[~nan], rtol=rtol, atol=rtol * scale, err_msg=what)


def _run(dtype, index, c, *, tau=1.0, cap=None, entropy=True, grad="same", inplace=False, ldx=None, n=64):
    import cupy as cp

    from gpuce._cuda import tokens

    store, x, lab, gl, gh = _inputs(dtype, n, c, f"{dtype}-{index}-{c}-{tau}-{cap}-{grad}-{inplace}-{ldx}", ldx)
    acc = ACC[dtype]
    want = _reference(x, lab, tau, cap or 0.0, gl, gh)
    store_d = cp.asarray(store)
    x_d = store_d[:, :c]
    logp = cp.full(n, -7.0, acc)
    ent = cp.full(n, -7.0, acc) if entropy else None
    if grad is None:
        g = None
    elif inplace:
        g = x_d
    else:
        g = cp.full((n, c), -7.0, x_d.dtype if grad == "same" else acc)
    tokens.token_rows(x_d, cp.asarray(lab.astype(index)), acc=acc, inv_temperature=1.0 / tau, softcap=cap,
                      ignore_index=IGNORE, logp_out=logp, entropy_out=ent, grad_out=g,
                      g_logp=cp.asarray(gl.astype(acc)) if g is not None else None,
                      g_entropy=cp.asarray(gh.astype(acc)) if g is not None else None)
    cp.cuda.get_current_stream().synchronize()
    rtol = TOL["float32" if acc == np.float32 else "float64"]
    _compare(logp.get(), want[0], rtol, "logp")
    if entropy:
        _compare(ent.get(), want[1], rtol, "entropy")
    if g is not None:
        gdt = dtype if grad == "same" else np.dtype(acc).name
        _compare(g.get().astype(np.float64), want[2], TOL[gdt], "gradient")
    if inplace and ldx and ldx > c:  # the columns past C keep their logits
        np.testing.assert_array_equal(store_d.get()[:, c:], store[:, c:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", ["int32", "int64"])
@pytest.mark.parametrize("c", [7, 1000, 50257])
def test_forward_and_backward(dtype, index, c):
    _run(dtype, index, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [33, 4096, 131072])
def test_temperature_and_softcap(dtype, c):
    _run(dtype, "int64", c, tau=0.7, cap=20.0)
    _run(dtype, "int64", c, tau=1.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [100, 32000])
def test_forward_only(dtype, c):
    _run(dtype, "int64", c, entropy=False, grad=None)
    _run(dtype, "int32", c, entropy=True, grad=None)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("c", [77, 5000, 128256])
def test_float32_gradient_of_16_bit_logits(dtype, c):
    _run(dtype, "int64", c, grad="acc", tau=0.9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,ldx", [(1001, 1003), (50257, 50260), (64, 64)])
def test_in_place_over_strided_rows(dtype, c, ldx):
    _run(dtype, "int64", c, inplace=True, ldx=ldx)
    _run(dtype, "int32", c, inplace=True, ldx=ldx, tau=0.8, cap=10.0)


def test_zero_rows():
    import cupy as cp

    from gpuce._cuda import tokens

    x = cp.zeros((0, 10), cp.float32)
    tokens.token_rows(x, cp.zeros(0, cp.int64), acc=np.float32, inv_temperature=1.0, softcap=None,
                      ignore_index=IGNORE, logp_out=cp.zeros(0, cp.float32), entropy_out=None)
