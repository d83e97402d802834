"""Chunked linear_cross_entropy: every chunk size gives the unchunked result, memory stays
O(chunk x C + N x D + C x D), and the cuBLAS argument mapping of gpuce._blas is right."""

import itertools
import tracemalloc
import zlib

import numpy as np
import pytest

import gpuce
import gpuce.linear as L
import gpuce._chunks as K
from gpuce import _blas
from helpers import to_numpy
from test_linear import data, ref_linear

OPTIONS = list(itertools.product(["label", "prob"], ["mean", "sum", "none"], [False, True],
                                 [False, True], [0.0, 0.1], [0.0, 1e-3]))


def run(xp, X, W, y, b=None, w=None, **kw):
    return gpuce.linear_cross_entropy(
        xp.asarray(X), xp.asarray(W), xp.asarray(y), bias=None if b is None else xp.asarray(b),
        weight=None if w is None else xp.asarray(w), return_grad=True, **kw)


@pytest.mark.parametrize("kind,reduction,with_bias,weighted,smoothing,z", OPTIONS)
def test_every_option_every_chunking(xp, kind, reduction, with_bias, weighted, smoothing, z):
    """float64 against the float64 reference for chunk sizes 1, 4, 7, N and > N."""
    rng = np.random.default_rng(zlib.crc32(repr(("chunk", kind, reduction, with_bias, weighted,
                                                smoothing, z)).encode()))
    n, d, c = 23, 5, 6
    X, W, y = data(rng, n, d, c, kind, np.float64)
    b = rng.standard_normal(c) if with_bias else None
    w = rng.random(c) + 0.5 if weighted else None
    kw = dict(label_smoothing=smoothing, z_loss=z, reduction=reduction)
    rl, rdW, rdX, rdb = ref_linear(X, W, y, b, 0.3, kind, weight=w, **kw)
    for chunk in (1, 4, 7, n, 1000):
        loss, g = run(xp, X, W, y, b, w, reg=0.3, chunk_size=chunk, **kw)
        np.testing.assert_allclose(to_numpy(loss), rl, rtol=1e-10, atol=1e-12, err_msg=f"chunk {chunk}")
        np.testing.assert_allclose(to_numpy(g.W), rdW, rtol=1e-10, atol=1e-12, err_msg=f"chunk {chunk}")
        np.testing.assert_allclose(to_numpy(g.X), rdX, rtol=1e-10, atol=1e-12, err_msg=f"chunk {chunk}")
        if b is not None:
            np.testing.assert_allclose(to_numpy(g.bias), rdb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float32_chunked_matches_unchunked(xp, kind, reduction):
    """The criterion: 1e-5 relative in float32, ignore_index rows included (data()
    ignores ~15 % of the labels), every option on."""
    rng = np.random.default_rng(7)
    n, d, c = 300, 24, 40
    X, W, y = data(rng, n, d, c, kind, np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    w = (rng.random(c) + 0.5).astype(np.float32)
    kw = dict(reg=0.05, reduction=reduction, label_smoothing=0.1, z_loss=1e-4)
    one_loss, one = run(xp, X, W, y, b, w, chunk_size=n, **kw)
    for chunk in (1, 37, 128):
        loss, g = run(xp, X, W, y, b, w, chunk_size=chunk, **kw)
        np.testing.assert_allclose(to_numpy(loss), to_numpy(one_loss), rtol=1e-5, atol=1e-7)
        for got, want in zip(g, one):
            scale = float(np.abs(to_numpy(want)).max())
            np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-5, atol=1e-5 * scale)


def test_float16_against_reference(xp):
    rng = np.random.default_rng(3)
    X, W, y = data(rng, 90, 16, 12, "label", np.float16)
    rl, rdW, rdX, _ = ref_linear(X, W, y, None, 0.1, "label", reduction="mean")
    loss, g = run(xp, X, W, y, reg=0.1, chunk_size=32)
    assert loss.dtype == np.float32 and g.W.dtype == np.float16 and g.X.dtype == np.float16
    np.testing.assert_allclose(to_numpy(loss), rl, rtol=2e-3)
    np.testing.assert_allclose(to_numpy(g.W).astype(np.float64), rdW, rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(to_numpy(g.X).astype(np.float64), rdX, rtol=2e-2, atol=2e-3)


def test_all_ignored_and_empty(xp):
    rng = np.random.default_rng(0)
    X, W, _ = data(rng, 10, 3, 4, "label", np.float64)
    y = np.full(10, -100)
    loss, g = run(xp, X, W, y, reg=0.5, chunk_size=3)
    assert float(to_numpy(loss)) == pytest.approx(0.25 * float((W ** 2).sum()))
    np.testing.assert_array_equal(to_numpy(g.X), 0)
    np.testing.assert_allclose(to_numpy(g.W), 0.5 * W)
    loss, g = run(xp, X[:0], W, y[:0], b=np.zeros(4), reg=0.0, chunk_size=3)
    assert float(to_numpy(loss)) == 0.0 and g.X.shape == (0, 3)
    np.testing.assert_array_equal(to_numpy(g.W), 0)
    np.testing.assert_array_equal(to_numpy(g.bias), 0)


def test_label_error_names_the_callers_row(xp):
    rng = np.random.default_rng(0)
    X, W, y = data(rng, 20, 3, 4, "label", np.float64)
    y[17] = 9
    with pytest.raises(ValueError, match=r"label 9 at position \(17,\)"):
        run(xp, X, W, y, chunk_size=5)


@pytest.mark.parametrize("bad,err", [(0, ValueError), (-3, ValueError), (2.5, TypeError),
                                     (True, TypeError), ("4", TypeError)])
def test_bad_chunk_size(xp, bad, err):
    rng = np.random.default_rng(0)
    X, W, y = data(rng, 8, 3, 4, "label", np.float64)
    with pytest.raises(err, match="chunk_size"):
        run(xp, X, W, y, chunk_size=bad)


def test_caller_arrays_untouched_when_chunked(xp):
    rng = np.random.default_rng(5)
    X, W, y = data(rng, 31, 4, 6, "prob", np.float64)
    b = rng.standard_normal(6)
    arrays = [xp.asarray(a) for a in (X, W, y, b)]
    before = [to_numpy(a).copy() for a in arrays]
    gpuce.linear_cross_entropy(*arrays[:3], bias=arrays[3], reg=0.2, return_grad=True, chunk_size=4)
    for a, b0 in zip(arrays, before):
        np.testing.assert_array_equal(to_numpy(a), b0)


def test_auto_chunk_size_policy():
    # a small problem runs in one chunk
    assert K.auto_chunk_size(np, 5000, 10, 4, grads_bytes=10**6) == 5000
    # a large vocabulary: the buffer is AUTO_CHUNK_FRACTION of the gradients (CCE's shape)
    n, c, d = 8192, 256000, 2304
    grads = (n * d + c * d) * 4
    rows = K.auto_chunk_size(np, n, c, 4, grads)
    assert 1 <= rows < n
    buf = rows * (c * 4 + K.ROW_OVERHEAD_BYTES)
    assert buf <= K.AUTO_CHUNK_FRACTION * grads
    assert (rows + 1) * (c * 4 + K.ROW_OVERHEAD_BYTES) > K.AUTO_CHUNK_FRACTION * grads
    # never zero rows, whatever the budget
    assert K.auto_chunk_size(np, 10, 10**9, 8, 0) == 1


def test_auto_chunking_splits_and_agrees(monkeypatch):
    """With a small byte budget the automatic size gives several chunks, same results."""
    rng = np.random.default_rng(11)
    X, W, y = data(rng, 200, 8, 50, "label", np.float64)
    want = run(np, X, W, y, reg=0.1, chunk_size=200)
    calls = []
    real = L.run_rows

    def counting(xp, x2, *args, **kw):
        calls.append(x2.shape[0])
        return real(xp, x2, *args, **kw)

    monkeypatch.setattr(L, "run_rows", counting)
    monkeypatch.setattr(K, "AUTO_CHUNK_MIN_BYTES", 64 * (50 * 8 + K.ROW_OVERHEAD_BYTES))
    monkeypatch.setattr(K, "AUTO_CHUNK_FRACTION", 0.0)
    got = run(np, X, W, y, reg=0.1)
    assert calls == [64, 64, 64, 8]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    assert got[1].bias is None
    for a, b in zip(got[1][:2], want[1][:2]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_host_peak_memory_is_chunk_sized():
    """tracemalloc sees NumPy's buffers: the chunked call never allocates N x C."""
    rng = np.random.default_rng(2)
    n, d, c = 4096, 16, 2048
    X, W, y = data(rng, n, d, c, "label", np.float64)
    full = n * c * 8  # 64 MiB of logits
    outputs = (n * d + c * d) * 8
    gpuce.linear_cross_entropy(X[:4], W, y[:4], return_grad=True, chunk_size=2)  # lazy imports
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        loss, g = gpuce.linear_cross_entropy(X, W, y, return_grad=True, chunk_size=64)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    chunk_buf = 64 * c * 8
    # outputs + the chunk buffer + small change (dW accumulates in place through BLAS)
    assert peak < outputs + chunk_buf + (1 << 20), peak
    assert peak < full / 8
    ref = gpuce.linear_cross_entropy(X, W, y, return_grad=True, chunk_size=n)
    np.testing.assert_allclose(loss, ref[0], rtol=1e-12)


@pytest.mark.gpu
def test_gpu_peak_memory_near_lower_bound():
    """CuPy's pool holds every block it handed out: its growth bounds the call's peak."""
    import cupy as cp

    rng = np.random.default_rng(4)
    n, d, c = 2048, 256, 32768
    X, W, y = (cp.asarray(a) for a in data(rng, n, d, c, "label", np.float32))
    pool = cp.get_default_memory_pool()
    lower = (n * d + c * d) * 4
    for chunk, bound in ((16, 1.1 * lower + (1 << 20)), (None, lower + K.AUTO_CHUNK_MIN_BYTES + (4 << 20))):
        cp.cuda.Device().synchronize()
        pool.free_all_blocks()
        before = pool.total_bytes()
        loss, g = gpuce.linear_cross_entropy(X, W, y, return_grad=True, chunk_size=chunk)
        cp.cuda.Device().synchronize()
        extra = pool.total_bytes() - before
        assert extra <= bound, (chunk, extra, lower)
        del loss, g


# -- the cuBLAS argument mapping, checked with a column-major GEMM written here -------------

def colmajor_gemm(opa, opb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """BLAS's column-major GEMM on flat buffers (a reference for the argument mapping)."""
    def mat(buf, ld, rows, cols):
        return np.lib.stride_tricks.as_strided(buf, (rows, cols), (buf.itemsize, ld * buf.itemsize))

    A = mat(a, lda, *((m, k) if opa == "N" else (k, m)))
    B = mat(b, ldb, *((k, n) if opb == "N" else (n, k)))
    Cm = mat(c, ldc, m, n)
    res = alpha * ((A if opa == "N" else A.T) @ (B if opb == "N" else B.T)) + beta * Cm
    Cm[...] = res


@pytest.mark.parametrize("transa,transb", list(itertools.product("NT", "NT")))
def test_rowmajor_as_colmajor(transa, transb):
    rng = np.random.default_rng(1)
    m, n, k = 5, 7, 3
    A = rng.standard_normal((m, k) if transa == "N" else (k, m))
    B = rng.standard_normal((k, n) if transb == "N" else (n, k))
    out = rng.standard_normal((m, n))
    want = 0.5 * (A if transa == "N" else A.T) @ (B if transb == "N" else B.T) + 2.0 * out
    opf, ops, mm, nn, kk, first, ldf, second, lds, ldc = _blas.rowmajor_as_colmajor(
        transa, transb, A, B, out)
    colmajor_gemm(opf, ops, mm, nn, kk, 0.5, first.ravel(), ldf, second.ravel(), lds, 2.0,
                  out.ravel(), ldc)
    np.testing.assert_allclose(out, want, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.25, 0.0), (1.0, 1.0), (-2.0, 0.5)])
def test_gemm(xp, dtype, alpha, beta):
    rng = np.random.default_rng(2)
    A = rng.standard_normal((6, 4)).astype(dtype)
    B = rng.standard_normal((6, 5)).astype(dtype)
    out0 = rng.standard_normal((4, 5)).astype(dtype)
    want = alpha * A.astype(np.float64).T @ B.astype(np.float64) + beta * out0.astype(np.float64)
    out = xp.asarray(out0)
    _blas.gemm(xp, "T", "N", xp.asarray(A), xp.asarray(B), out, alpha, beta)
    tol = 1e-2 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(to_numpy(out).astype(np.float64), want, rtol=tol, atol=tol)


def test_gemm_degenerate_shapes(xp):
    out = xp.full((3, 2), np.nan)
    _blas.gemm(xp, "N", "N", xp.zeros((3, 0)), xp.zeros((0, 2)), out, 1.0, 0.0)
    np.testing.assert_array_equal(to_numpy(out), 0)
    with pytest.raises(ValueError, match="gemm shapes"):
        _blas.gemm(xp, "N", "N", xp.zeros((3, 2)), xp.zeros((3, 2)), out)


def test_grad_row_scale(xp):
    """Gradients of Σ g_i L_i + λ/2‖W‖² (what a backward pass through reduction="none" needs)."""
    rng = np.random.default_rng(8)
    X, W, y = data(rng, 30, 4, 5, "label", np.float64)
    b = rng.standard_normal(5)
    g = rng.random(30) + 0.25
    f = X @ W.T + b
    import reference as R

    rows, G = R.sce(f, y, kind="label", reduction="none")
    G = G * g[:, None]
    loss, grads = run(xp, X, W, y, b, reg=0.2, reduction="none", chunk_size=7,
                      grad_row_scale=xp.asarray(g))
    np.testing.assert_allclose(to_numpy(loss), rows, rtol=1e-10, atol=1e-12)  # loss unscaled
    np.testing.assert_allclose(to_numpy(grads.X), G @ W, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(grads.W), G.T @ X + 0.2 * W, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(grads.bias), G.sum(0), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="grad_row_scale"):
        run(xp, X, W, y, reduction="mean", grad_row_scale=xp.asarray(g))
    with pytest.raises(ValueError, match="grad_row_scale"):
        run(xp, X, W, y, reduction="none", grad_row_scale=xp.asarray(g[:3]))


def test_gemm_strided_output():
    """A non-contiguous NumPy output (scipy copies it) still receives the result."""
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((4, 3)), rng.standard_normal((3, 5))
    big = rng.standard_normal((4, 10))
    out = big[:, ::2]
    want = A @ B + out
    _blas.gemm(np, "N", "N", A, B, out, 1.0, 1.0)
    np.testing.assert_allclose(big[:, ::2], want, rtol=1e-12)
