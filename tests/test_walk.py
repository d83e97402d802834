"""Inputs with no (N, C) view are walked in row blocks, never copied whole:
softmax_cross_entropy on e.g. (T, B, C).transpose(1, 0, 2), and the NumPy softmax family."""

import itertools
import math
import tracemalloc
import zlib

import numpy as np
import pytest

import gpuce
import gpuce._rows as R
from gpuce._blocks import row_blocks, rows_viewable
from helpers import TOL, to_numpy
from test_sce import ref_for


def seed(name: str) -> int:
    return zlib.crc32(name.encode())


def time_major(xp, rng, t, b, c, dtype):
    """(T, B, C) logits seen as (B, T, C): leading dimensions that do not merge."""
    base = xp.asarray((rng.standard_normal((t, b, c)) * 3).astype(dtype))
    x = base.transpose(1, 0, 2)
    assert not rows_viewable(x.shape, x.strides)
    return x


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 rows (of 7 classes), so every test walks many blocks on both backends."""
    monkeypatch.setattr(R, "WALK_BLOCK_ELEMENTS_NUMPY", 3 * 7)
    monkeypatch.setattr(R, "WALK_BLOCK_ELEMENTS_CUPY", 3 * 7)


# ---- the index arithmetic ----------------------------------------------------------------

@pytest.mark.parametrize("lead,max_rows", [((), 4), ((5,), 2), ((3, 4), 5), ((2, 3, 4), 7),
                                           ((2, 3, 4), 1), ((2, 3, 4), 100), ((4, 0, 2), 3),
                                           ((1, 9, 1), 4)])
def test_row_blocks_cover_rows_in_order(lead, max_rows):
    n = math.prod(lead)
    rows = np.arange(n).reshape(lead) if lead else np.array(0)
    seen = []
    for index, r0, r1 in row_blocks(lead, max_rows):
        block = rows[index]
        assert block.size == r1 - r0 and block.size <= max(max_rows, 1)
        np.testing.assert_array_equal(np.ravel(block), np.arange(r0, r1))
        seen.extend(np.ravel(block).tolist())
    assert seen == list(range(n))


def test_rows_viewable():
    a = np.zeros((4, 5, 6))
    cases = [(a, True), (a.transpose(1, 0, 2), False), (a[:, :1].transpose(1, 0, 2), True),
             (a[:, :, ::3], True), (a[::2], False), (a[:, ::2], False), (a[::2, :, :3], False),
             (a[:1, ::2], True),
             (np.asfortranarray(a), False), (a[:0].transpose(1, 0, 2), True)]
    for v, viewable in cases:
        assert rows_viewable(v.shape, v.strides) == viewable, (v.shape, v.strides)
        # agrees with NumPy: a view exists exactly when reshape needs no copy
        if v.size:
            # (reshape's copy=False needs NumPy >= 2.1; a reshape that needs no copy returns a
            # view of the same buffer, one that needs a copy a new array)
            ok = np.shares_memory(v.reshape(-1, v.shape[-1]), v)
            assert ok == viewable, (v.shape, v.strides)


# ---- softmax_cross_entropy on walked inputs ------------------------------------------------

OPTIONS = list(itertools.product(["label", "prob"], ["mean", "sum", "none"], [False, True],
                                 [0.0, 0.1]))


@pytest.mark.parametrize("kind,reduction,weighted,smoothing", OPTIONS)
def test_walked_against_reference_and_contiguous(xp, small_blocks, kind, reduction, weighted,
                                                 smoothing):
    rng = np.random.default_rng(seed(f"walk {kind} {reduction} {weighted} {smoothing}"))
    x = time_major(xp, rng, 5, 4, 7, np.float64)
    c = 7
    if kind == "label":
        t = rng.integers(0, c, (4, 5))
        t[rng.random((4, 5)) < 0.2] = -100
    else:
        t = rng.random((4, 5, c))
        t /= t.sum(-1, keepdims=True)
    w = rng.random(c) + 0.5 if weighted else None
    kw = dict(reduction=reduction, label_smoothing=smoothing, z_loss=1e-3)
    x_np = to_numpy(x)
    ref_loss, ref_grad = ref_for(x_np, t, kind, weight=w, **kw)
    wd = None if w is None else xp.asarray(w)
    loss, grad = gpuce.softmax_cross_entropy(x, xp.asarray(t), weight=wd, return_grad=True, **kw)
    assert grad.shape == x.shape and grad.dtype == x.dtype and loss.dtype == np.float64
    np.testing.assert_array_equal(to_numpy(x), x_np)  # the caller's logits untouched
    np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(grad), ref_grad, rtol=1e-10, atol=1e-12)
    # the same call on a contiguous copy: equal to rounding
    cl, cg = gpuce.softmax_cross_entropy(xp.ascontiguousarray(x), xp.asarray(t), weight=wd,
                                         return_grad=True, **kw)
    np.testing.assert_allclose(to_numpy(loss), to_numpy(cl), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(to_numpy(grad), to_numpy(cg), rtol=1e-13, atol=1e-15)
    lo = gpuce.softmax_cross_entropy(x, xp.asarray(t), weight=wd, **kw)  # loss only
    np.testing.assert_allclose(to_numpy(lo), to_numpy(loss), rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_walked_low_precision(xp, small_blocks, dtype):
    rng = np.random.default_rng(seed(f"walk {np.dtype(dtype).name}"))
    x = time_major(xp, rng, 6, 3, 7, dtype)
    t = rng.integers(0, 7, (3, 6))
    ref_loss, ref_grad = ref_for(to_numpy(x), t, "label", reduction="mean", label_smoothing=0.05)
    loss, grad = gpuce.softmax_cross_entropy(x, xp.asarray(t), label_smoothing=0.05,
                                             return_grad=True)
    rtol, atol = TOL[np.dtype(dtype)]
    assert grad.dtype == dtype and loss.dtype == np.float32
    np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=rtol)
    np.testing.assert_allclose(to_numpy(grad).astype(np.float64), ref_grad, rtol=rtol, atol=atol)


def test_walked_inplace(xp, small_blocks):
    """The gradient lands in the caller's non-viewable logits, block by block."""
    rng = np.random.default_rng(seed("walk inplace"))
    x = time_major(xp, rng, 5, 4, 7, np.float64)
    t = rng.integers(0, 7, (4, 5))
    ref_loss, ref_grad = ref_for(to_numpy(x), t, "label", reduction="mean")
    loss, grad = gpuce.softmax_cross_entropy(x, xp.asarray(t), return_grad=True, inplace=True)
    assert grad is x
    np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=1e-10)
    np.testing.assert_allclose(to_numpy(x), ref_grad, rtol=1e-10, atol=1e-12)


def test_walked_adversarial_rows_and_zero_weight(xp, small_blocks):
    x = np.zeros((3, 4, 7))
    x[0, 1, 2] = np.nan
    x[1, 0, :] = -np.inf
    x[2, 3, 0] = np.inf
    x[1, 2, 4] = -np.inf
    xd = xp.asarray(np.ascontiguousarray(x.transpose(1, 0, 2))).transpose(1, 0, 2)
    t = np.array([[1, 2, 3, -100], [0, 5, 1, 2], [3, 3, 6, 0]])
    for w in (None, np.array([0.0, 1, 1, 1, 1, 0.5, 2])):
        ref_loss, ref_grad = ref_for(x, t, "label", weight=w, reduction="none")
        wd = None if w is None else xp.asarray(w)
        loss, grad = gpuce.softmax_cross_entropy(xd, xp.asarray(t), weight=wd, reduction="none",
                                                 return_grad=True)
        np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=1e-12)
        np.testing.assert_allclose(to_numpy(grad), ref_grad, rtol=1e-12, atol=1e-15)


def test_walked_bad_label_names_callers_position_before_writing(xp, small_blocks):
    rng = np.random.default_rng(seed("walk bad label"))
    x = time_major(xp, rng, 5, 4, 7, np.float32)
    before = to_numpy(x).copy()
    t = rng.integers(0, 7, (4, 5))
    t[3, 2] = 7
    with pytest.raises(ValueError, match=r"label 7 at position \(3, 2\)"):
        gpuce.softmax_cross_entropy(x, xp.asarray(t), return_grad=True, inplace=True)
    np.testing.assert_array_equal(to_numpy(x), before)


def test_walked_all_ignored_and_zero_weight_sum(xp, small_blocks):
    rng = np.random.default_rng(seed("walk zero denominator"))
    x = time_major(xp, rng, 5, 4, 7, np.float64)
    for t, w in ((np.full((4, 5), -100), None),
                 (np.full((4, 5), 3), np.array([1.0, 1, 1, 0, 1, 1, 1]))):
        wd = None if w is None else xp.asarray(w)
        loss, grad = gpuce.softmax_cross_entropy(x, xp.asarray(t), weight=wd, return_grad=True)
        assert float(to_numpy(loss)) == 0.0 and not to_numpy(grad).any()


def test_walked_host_peak_memory_is_block_sized():
    """tracemalloc sees NumPy's buffers: no copy of the (B, T, C) logits, only block-sized
    temporaries beside the gradient output."""
    rng = np.random.default_rng(seed("walk memory"))
    T, B, C = 64, 32, 4096  # 64 MiB of float64 logits
    x = rng.standard_normal((T, B, C)).transpose(1, 0, 2)
    t = rng.integers(0, C, (B, T))
    full = x.nbytes
    gpuce.softmax_cross_entropy(x[:1, :2], t[:1, :2], return_grad=True)  # lazy imports
    peaks = {}
    for return_grad in (False, True):
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            out = gpuce.softmax_cross_entropy(x, t, return_grad=return_grad)
            peaks[return_grad] = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        del out
    block = R.WALK_BLOCK_ELEMENTS_NUMPY * 8
    assert peaks[False] < 3 * block, peaks  # one block's copy and the backend's chunk buffers
    assert peaks[True] < full + 3 * block, peaks  # the gradient output itself is full size
    assert peaks[False] < full / 3
    loss, grad = gpuce.softmax_cross_entropy(x, t, return_grad=True)
    cl, cg = gpuce.softmax_cross_entropy(np.ascontiguousarray(x), t, return_grad=True)
    np.testing.assert_allclose(loss, cl, rtol=1e-13)
    np.testing.assert_allclose(grad, cg, rtol=1e-13, atol=1e-18)


@pytest.mark.gpu
def test_gpu_walked_memory_is_block_sized():
    """CuPy's pool growth bounds the call's device memory: the output and block buffers,
    not a second copy of the logits."""
    import cupy as cp

    rng = np.random.default_rng(seed("walk gpu memory"))
    T, B, C = 256, 64, 8192  # 512 MiB of float32 logits
    x = cp.asarray(rng.standard_normal((T, B, C), dtype=np.float32)).transpose(1, 0, 2)
    t = cp.asarray(rng.integers(0, C, (B, T)))
    pool = cp.get_default_memory_pool()
    gpuce.softmax_cross_entropy(x[:1, :2], t[:1, :2], return_grad=True)
    cp.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    loss, grad = gpuce.softmax_cross_entropy(x, t, return_grad=True)
    cp.cuda.Device().synchronize()
    extra = pool.total_bytes() - before - grad.nbytes
    assert extra < 3 * R.WALK_BLOCK_ELEMENTS_CUPY * 4 + (64 << 20), extra
    cl, cg = gpuce.softmax_cross_entropy(cp.ascontiguousarray(x), t, return_grad=True)
    np.testing.assert_allclose(loss.get(), cl.get(), rtol=1e-6)
    np.testing.assert_allclose(grad.get(), cg.get(), rtol=1e-5, atol=1e-9)


# ---- softmax / log_softmax / logsumexp on NumPy: row blocks, not full-size temporaries -----

@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_softmax_family_host_peak_memory(name, dtype):
    fn = getattr(gpuce, name)
    rng = np.random.default_rng(seed(f"softmax memory {name}"))
    x = rng.standard_normal((1024, 4096)).astype(dtype)  # 32 MiB float64, 8 MiB float16
    fn(x[:2])
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn(x)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    extra = peak - out.nbytes
    # two float32/64 temporaries of one block (at least one row), plus small change
    block = max(R.NUMPY_BLOCK_ELEMENTS, 4096) * max(np.dtype(dtype).itemsize, 4)
    assert extra < 3 * block + (256 << 10), (extra, block)
    assert extra < x.nbytes / 2


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_softmax_family_blocks_match_reference(xp, monkeypatch, axis):
    """Tiny blocks (one row each, and several rows each) against scipy on every axis."""
    import scipy.special as sp

    rng = np.random.default_rng(seed(f"softmax blocks {axis}"))
    x = rng.standard_normal((5, 6, 7)) * 4
    x[1, 2, 3] = np.nan
    x[3, :, :] = -np.inf
    xd = xp.asarray(x).transpose(1, 0, 2)
    xn = x.transpose(1, 0, 2)
    for elements in (1, 20):
        monkeypatch.setattr(R, "NUMPY_BLOCK_ELEMENTS", elements)
        with np.errstate(all="ignore"):
            lse_ref = sp.logsumexp(xn, axis=axis)
            sm_ref = sp.softmax(xn, axis=axis)
            lsm_ref = sp.log_softmax(xn, axis=axis)
        bad = ~np.isfinite(np.expand_dims(lse_ref, axis))
        sm_ref = np.where(bad, np.nan, sm_ref)
        lsm_ref = np.where(bad, np.nan, lsm_ref)
        np.testing.assert_allclose(to_numpy(gpuce.logsumexp(xd, axis=axis)), lse_ref, rtol=1e-13)
        np.testing.assert_allclose(to_numpy(gpuce.softmax(xd, axis=axis)), sm_ref, rtol=1e-12,
                                   atol=1e-300)
        np.testing.assert_allclose(to_numpy(gpuce.log_softmax(xd, axis=axis)), lsm_ref,
                                   rtol=1e-12)


def test_walked_uint64_labels(xp, small_blocks):
    """The walk's label check and mean's denominator read uint64 labels as their values."""
    rng = np.random.default_rng(seed("walk uint64"))
    x = time_major(xp, rng, 5, 4, 7, np.float64)
    t = rng.integers(0, 7, (4, 5))
    w = xp.asarray(rng.random(7) + 0.5)
    a = gpuce.softmax_cross_entropy(x, xp.asarray(t.astype(np.uint64)), weight=w)
    b = gpuce.softmax_cross_entropy(x, xp.asarray(t), weight=w)
    np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-15)
    t = t.astype(np.uint64)
    t[2, 3] = 2**64 - 1
    with pytest.raises(ValueError, match=rf"label {2**64 - 1} at position \(2, 3\)"):
        gpuce.softmax_cross_entropy(x, xp.asarray(t), ignore_index=-1)
