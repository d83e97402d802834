"""16-bit gradients are rounded once, from float32, after every scaling, on every path.

The contiguous call scales the float32 gradient by the reduction's 1/denominator inside the
kernels and rounds it once.  The paths that split the rows into blocks (logits whose leading
dimensions do not merge, the chunked linear model, its row scales) must give the very same
16-bit values, not a block's unscaled gradient rounded and then scaled (a second rounding,
and an overflow of float16 where the unscaled gradient passes 65504: class weights of 1e5).
"""

import numpy as np
import pytest

import gpuce
from gpuce import _rows
from helpers import BFLOAT16, rng_for, to_numpy

F16 = np.dtype(np.float16)
HALVES = [pytest.param(F16, id="float16"), pytest.param(BFLOAT16, id="bfloat16")]


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so that even small walked inputs take many blocks."""
    monkeypatch.setattr(_rows, "WALK_BLOCK_ELEMENTS_NUMPY", 64)
    monkeypatch.setattr(_rows, "WALK_BLOCK_ELEMENTS_CUPY", 64)


def assert_same_16bit(got, want, xp):
    """The same 16-bit values.  On NumPy to the bit (one code path for every row).  On CuPy the
    blocks may run another fused variant than the whole array, whose float32 sums differ in
    the last bits, so that now and then a value rounds to the neighbouring 16-bit number: at
    most one ulp, in at most 0.5 % of the entries (a gradient rounded twice differs in 2-30 %)."""
    got, want = to_numpy(got), to_numpy(want)
    g64, w64 = got.astype(np.float64), want.astype(np.float64)
    if xp is np:
        np.testing.assert_array_equal(g64, w64)
        return
    np.testing.assert_array_equal(np.isfinite(g64), np.isfinite(w64))
    ulp = np.abs(np.spacing(want.astype(np.float32)).astype(np.float64)) * (
        2.0**13 if want.dtype == F16 else 2.0**16)
    diff = np.abs(g64 - w64)
    finite = np.isfinite(w64)
    assert (diff[finite] <= ulp[finite] * 1.0001).all()
    assert np.mean(diff[finite] > 0) <= 0.005


def walked(x):
    """(B, T, C) logits as the (T, B, C) transpose: no (N, C) view, the block walk's input."""
    return x.transpose(1, 0, 2)


def labels(rng, shape, c):
    y = rng.integers(0, c, shape)
    y[rng.random(shape) < 0.2] = -100
    return y


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("big_weights", [False, True])
def test_walked_equals_contiguous(xp, small_blocks, dtype, reduction, big_weights):
    rng = rng_for("walk", dtype.name, reduction, big_weights)
    b, t, c = 6, 5, 16
    xw = walked((rng.standard_normal((b, t, c)) * 3).astype(dtype))
    y = labels(rng, (t, b), c)
    w = None
    if big_weights:  # the unscaled float16 gradient overflows; the mean's is about 1
        w = np.full(c, 1e5, np.float32)
    if dtype == BFLOAT16 and big_weights and reduction != "mean":
        pytest.skip("bfloat16's range holds these sums either way: nothing to see")
    xc = np.ascontiguousarray(xw)
    opts = dict(reduction=reduction, return_grad=True,
                weight=None if w is None else xp.asarray(w))
    loss_w, grad_w = gpuce.softmax_cross_entropy(xp.asarray(xw), xp.asarray(y), **opts)
    loss_c, grad_c = gpuce.softmax_cross_entropy(xp.asarray(xc), xp.asarray(y), **opts)
    if reduction == "mean":
        assert np.isfinite(to_numpy(grad_w).astype(np.float64)).all()
    assert_same_16bit(grad_w, grad_c, xp)
    np.testing.assert_allclose(to_numpy(loss_w), to_numpy(loss_c), rtol=1e-6)


@pytest.mark.parametrize("dtype", HALVES)
def test_walked_inplace_equals_contiguous(xp, small_blocks, dtype):
    rng = rng_for("walk-inplace", dtype.name)
    x = walked((rng.standard_normal((4, 7, 12)) * 3).astype(dtype))
    y = labels(rng, (7, 4), 12)
    expected = gpuce.softmax_cross_entropy(xp.asarray(np.ascontiguousarray(x)), xp.asarray(y),
                                           return_grad=True)[1]
    xd = xp.asarray(np.ascontiguousarray(x.transpose(1, 0, 2))).transpose(1, 0, 2)
    _, grad = gpuce.softmax_cross_entropy(xd, xp.asarray(y), return_grad=True, inplace=True)
    assert grad is xd
    assert_same_16bit(grad, expected, xp)


def linear_problem(rng, dtype, n=40, d=8, c=24):
    X = (rng.standard_normal((n, d))).astype(dtype)
    W = (rng.standard_normal((c, d)) * 0.5).astype(dtype)
    y = labels(rng, n, c)
    return X, W, y


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("big_weights", [False, True])
def test_linear_chunks_equal_one_chunk(xp, dtype, big_weights):
    """dX is row-local: the same bits in chunks of 7 rows as in one chunk; dW and db sum the
    chunks in float32 and round once, so they agree to one rounding."""
    rng = rng_for("linear", dtype.name, big_weights)
    X, W, y = linear_problem(rng, dtype)
    c = W.shape[0]
    w = np.full(c, 1e5, np.float32) if big_weights else None
    b = np.zeros(c, dtype)
    out = {}
    for chunk in (7, None):
        _, g = gpuce.linear_cross_entropy(
            xp.asarray(X), xp.asarray(W), xp.asarray(y), bias=xp.asarray(b),
            weight=None if w is None else xp.asarray(w), return_grad=True, chunk_size=chunk)
        out[chunk] = list(g)
    for a in out[7]:
        assert np.isfinite(to_numpy(a).astype(np.float64)).all()
    assert_same_16bit(out[7][0], out[None][0], xp)
    out = {k: [to_numpy(a).astype(np.float64) for a in v] for k, v in out.items()}
    unit = 2.0**-11 if dtype == F16 else 2.0**-8
    for a, e in zip(out[7][1:], out[None][1:]):
        np.testing.assert_allclose(a, e, rtol=2 * unit, atol=1e-6 * np.abs(e).max())


@pytest.mark.parametrize("dtype", HALVES)
def test_linear_row_scales_round_once(xp, dtype):
    """reduction="none" with row scales g_i = 1/N (no ignored rows, no weights) is the mean's
    gradient: the scaled G must be rounded once, giving the mean's very bits."""
    rng = rng_for("row-scale", dtype.name)
    X, W, _ = linear_problem(rng, dtype)
    n, c = X.shape[0], W.shape[0]
    y = rng.integers(0, c, n)
    Xd, Wd, yd = xp.asarray(X), xp.asarray(W), xp.asarray(y)
    _, g_mean = gpuce.linear_cross_entropy(Xd, Wd, yd, return_grad=True, chunk_size=9)
    scale = xp.full(n, 1.0 / n, np.float32)
    _, g_rows = gpuce.linear_cross_entropy(Xd, Wd, yd, reduction="none", return_grad=True,
                                           grad_row_scale=scale, chunk_size=9)
    assert_same_16bit(g_rows.X, g_mean.X, xp)
    assert_same_16bit(g_rows.W, g_mean.W, xp)


def test_linear_fortran_x_is_not_copied_whole():
    """A Fortran-ordered X is read a chunk at a time (a chunk-sized copy), never copied whole."""
    import tracemalloc

    rng = rng_for("fortran")
    n, d, c = 20000, 64, 8
    X = np.asfortranarray(rng.standard_normal((n, d)).astype(np.float32))
    W = rng.standard_normal((c, d)).astype(np.float32)
    y = rng.integers(0, c, n)
    expected = gpuce.linear_cross_entropy(np.ascontiguousarray(X), W, y, chunk_size=1000)
    tracemalloc.start()
    try:
        loss = gpuce.linear_cross_entropy(X, W, y, chunk_size=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a copy of X would be X.nbytes; the finiteness check's flags are a byte an element
    assert peak < X.nbytes / 2, f"peak {peak} bytes for an X of {X.nbytes}"
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "class-axis-1"])
def test_torch_none_reduction_rounds_after_the_row_scales(dtype_name, layout):
    """gpuce.torch.cross_entropy(..., reduction="none") backward with incoming row gradients
    g_i: the 16-bit gradient is the float32 gradient of Σ g_i L_i rounded once, never a 16-bit
    gradient scaled afterwards (tiny g_i would underflow it to 0 in float16)."""
    torch = pytest.importorskip("torch")
    import gpuce.torch as gt

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(11)
    n, c = 12, 9
    x = (torch.randn(n, c, generator=g) * 3).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[3] = -100
    # small row scales (float16 underflow bait), in the loss's dtype as autograd passes them
    go = (torch.rand(n, generator=g) * 1e-4 + 1e-6).to(dtype)
    xin = x.clone().requires_grad_(True)
    arg = xin
    if layout == "class-axis-1":  # (N, C, 1): gpuce reads the classes moved last
        arg = xin.unsqueeze(-1)
    loss = gt.cross_entropy(arg, y if layout == "contiguous" else y.unsqueeze(-1),
                            reduction="none", label_smoothing=0.1)
    loss.backward(go if layout == "contiguous" else go.unsqueeze(-1))
    # expected: gpuce's float32 gradient of the same (exactly widened) values, scaled, rounded once
    _, g32 = gpuce.softmax_cross_entropy(x.float().numpy(), y.numpy(), reduction="none",
                                         return_grad=True, label_smoothing=0.1)
    want = torch.from_numpy(g32 * go.float().numpy()[:, None]).to(dtype)
    assert xin.grad.dtype == dtype
    torch.testing.assert_close(xin.grad, want, rtol=0, atol=0)
    assert (xin.grad != 0).float().mean() > 0.9  # nothing flushed to zero
