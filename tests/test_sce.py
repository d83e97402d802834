"""softmax_cross_entropy against the slow float64 reference, on NumPy and (with a GPU) CuPy."""

import itertools
import math
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gpuce
import reference as R
from helpers import TOL, to_numpy


def make_inputs(rng, shape, kind, dtype, ignore_frac=0.2, ignore_index=-100):
    c = shape[-1]
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    if kind == "label":
        t = rng.integers(0, c, size=shape[:-1]).astype(np.int64)
        mask = rng.random(shape[:-1]) < ignore_frac
        t[mask] = ignore_index
    else:
        t = rng.random(shape)
        t /= t.sum(-1, keepdims=True)
        t = t.astype(dtype)
    return x, t


def ref_for(x, t, kind, **kw):
    c = x.shape[-1]
    x2 = np.asarray(x, np.float64).reshape(-1, c)
    t2 = t.reshape(-1) if kind == "label" else np.asarray(t, np.float64).reshape(-1, c)
    loss, grad = R.sce(x2, t2, kind=kind, **kw)
    if kw.get("reduction") == "none":
        loss = loss.reshape(x.shape[:-1])
    return loss, grad.reshape(x.shape)


def check(xp, x, t, kind, dtype, *, weight=None, **kw):
    rtol, atol = TOL[np.dtype(dtype)]
    ref_loss, ref_grad = ref_for(x, t, kind, weight=weight, **kw)
    w = None if weight is None else xp.asarray(weight)
    x_dev, t_dev = xp.asarray(x), xp.asarray(t)
    x_before = to_numpy(x_dev).copy()
    loss, grad = gpuce.softmax_cross_entropy(x_dev, t_dev, weight=w, return_grad=True, **kw)
    assert type(loss) is type(x_dev) and type(grad) is type(x_dev)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    acc = np.float64 if dtype == np.float64 else np.float32
    assert loss.dtype == acc
    np.testing.assert_array_equal(to_numpy(x_dev), x_before)  # caller's logits untouched
    scale = max(1.0, float(np.nanmax(np.abs(ref_grad))) if ref_grad.size else 1.0)
    np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=rtol, atol=atol * 10)
    np.testing.assert_allclose(to_numpy(grad), ref_grad, rtol=rtol, atol=atol * scale)
    return loss, grad


OPTIONS = list(itertools.product(["mean", "sum", "none"], [False, True], [0.0, 0.1], [0.0, 1e-3]))


@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("reduction,weighted,smoothing,z", OPTIONS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_option(xp, kind, reduction, weighted, smoothing, z, dtype):
    rng = np.random.default_rng(zlib.crc32(repr((kind, reduction, weighted, smoothing, z)).encode()))
    x, t = make_inputs(rng, (37, 11), kind, dtype)
    weight = rng.random(11) + 0.5 if weighted else None
    check(xp, x, t, kind, dtype, weight=weight, reduction=reduction, label_smoothing=smoothing,
          z_loss=z)


@pytest.mark.parametrize("kind", ["label", "prob"])
def test_float16_accumulates_in_float32(xp, kind):
    rng = np.random.default_rng(7)
    x, t = make_inputs(rng, (64, 50), kind, np.float16)
    check(xp, x, t, kind, np.float16, reduction="mean", label_smoothing=0.05)


@pytest.mark.parametrize("shape", [(1823, 781), (9, 7, 41), (3, 423, 32000), (4, 1)])
def test_odd_shapes(xp, shape):
    rng = np.random.default_rng(sum(shape))
    x, t = make_inputs(rng, shape, "label", np.float32)
    check(xp, x, t, "label", np.float32, reduction="mean", label_smoothing=0.1)


def test_int32_labels_and_ignore_index_inside_range(xp):
    rng = np.random.default_rng(3)
    x, t = make_inputs(rng, (40, 9), "label", np.float64, ignore_frac=0)
    t = t.astype(np.int32)
    t[::3] = 4  # ignore_index that is also a valid class
    check(xp, x, t, "label", np.float64, ignore_index=4, reduction="mean", label_smoothing=0.2)


ADVERSARIAL = [
    [-1000.0, 1.0, 0.0],
    [1e4, -1e4, 0.0],
    [3.0, 3.0, 3.0],  # ties
    [-np.inf, 2.0, 1.0],  # -inf logit, target elsewhere
    [88.0, 89.0, 90.0],  # exp overflows float32 without the max shift
    [-1e4, -1e4 + 1, -1e4 + 2],
    [np.nan, 0.0, 1.0],
    [np.inf, 0.0, 1.0],
    [-np.inf, -np.inf, -np.inf],
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_adversarial_rows(xp, dtype, reduction):
    x = np.array(ADVERSARIAL, dtype)
    t = np.array([1, 0, 2, 1, 0, 2, 0, 1, 2])
    check(xp, x, t, "label", dtype, reduction=reduction)


def test_nan_row_documented(xp):
    x = np.array([[np.nan, 1.0], [0.0, 1.0], [np.inf, 0.0], [-np.inf, -np.inf]], np.float32)
    loss, grad = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray([0, 1, 1, 0]),
                                             reduction="none", return_grad=True)
    loss, grad = to_numpy(loss), to_numpy(grad)
    assert np.isnan(loss[[0, 2, 3]]).all() and np.isfinite(loss[1])
    assert np.isnan(grad[[0, 2, 3]]).all() and np.isfinite(grad[1]).all()


def test_neg_inf_logit_with_zero_target_is_finite(xp):
    x = np.array([[-np.inf, 0.5, 1.0]], np.float32)
    p = np.array([[0.0, 0.3, 0.7]], np.float32)
    loss, grad = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(p), return_grad=True)
    assert np.isfinite(to_numpy(loss)) and np.isfinite(to_numpy(grad)).all()
    loss_l = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray([2]))
    assert np.isfinite(to_numpy(loss_l))
    # mass on the -inf logit: +inf, as H(P,Q) with q = 0 < p
    assert np.isposinf(to_numpy(gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray([0]))))


def test_all_ignored_mean_is_zero_with_zero_grad(xp):
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    x[0, 0] = np.nan  # ignored rows do not leak NaN
    t = np.full(5, -100)
    loss, grad = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), return_grad=True)
    assert float(to_numpy(loss)) == 0.0
    assert not to_numpy(grad).any()


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_zero_weight_sum_mean_is_zero_with_zero_grad(xp, smoothing):
    """Every non-ignored row's class has weight 0: "mean" divides by 0 and gives 0 (as with all
    rows ignored), whatever the smoothing term adds; "sum" still counts that term."""
    rng = np.random.default_rng(zlib.crc32(b"zero weight sum"))
    x = rng.standard_normal((6, 4))
    t = np.array([1, 3, -100, 1, 3, 1])
    w = np.array([2.0, 0.0, 0.5, 0.0])
    loss, grad = check(xp, x, t, "label", np.float64, weight=w, label_smoothing=smoothing)
    assert float(to_numpy(loss)) == 0.0 and not to_numpy(grad).any()
    s, _ = check(xp, x, t, "label", np.float64, weight=w, label_smoothing=smoothing,
                 reduction="sum")
    assert (float(to_numpy(s)) > 0) == (smoothing > 0)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("kind", ["label", "prob"])
def test_empty_batch(xp, reduction, kind):
    x = np.zeros((0, 6), np.float32)
    t = np.zeros((0,), np.int64) if kind == "label" else np.zeros((0, 6), np.float32)
    loss, grad = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), reduction=reduction,
                                             return_grad=True)
    assert grad.shape == (0, 6)
    if reduction == "none":
        assert loss.shape == (0,)
    else:
        assert loss.shape == () and float(to_numpy(loss)) == 0.0


def test_single_class(xp):
    x = np.array([[3.0], [-2.0]], np.float64)
    check(xp, x, np.array([0, 0]), "label", np.float64, reduction="sum")


@pytest.mark.parametrize("layout", ["fortran", "strided", "transposed"])
def test_non_contiguous_logits(xp, layout):
    rng = np.random.default_rng(11)
    base = rng.standard_normal((30, 26))
    x = {"fortran": np.asfortranarray(base), "strided": base[::2, ::2],
         "transposed": base.T[:, :13].T}[layout].astype(np.float64, order="K")
    if layout == "fortran":
        x = np.asfortranarray(x)
    t = rng.integers(0, x.shape[1], x.shape[0])
    xd = xp.asarray(x) if xp is np else xp.asarray(x)
    ref_loss, ref_grad = ref_for(x, t, "label", reduction="mean")
    loss, grad = gpuce.softmax_cross_entropy(xd, xp.asarray(t), return_grad=True)
    np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=1e-10)
    np.testing.assert_allclose(to_numpy(grad), ref_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("layout", ["contiguous", "fortran"])
def test_inplace_writes_grad_into_logits(xp, layout):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((12, 7)).astype(np.float32)
    if layout == "fortran":
        x = np.asfortranarray(x)
    t = rng.integers(0, 7, 12)
    ref_loss, ref_grad = ref_for(x, t, "label", reduction="mean", label_smoothing=0.1)
    xd = xp.asarray(x)
    if layout == "fortran":
        xd = xp.asfortranarray(xd)
    loss, grad = gpuce.softmax_cross_entropy(xd, xp.asarray(t), return_grad=True, inplace=True,
                                             label_smoothing=0.1)
    assert grad is xd
    np.testing.assert_allclose(to_numpy(xd), ref_grad, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=2e-5)


def test_loss_only_matches_loss_with_grad(xp):
    rng = np.random.default_rng(9)
    x, t = make_inputs(rng, (20, 13), "prob", np.float32)
    a = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), z_loss=1e-2)
    b, _ = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), z_loss=1e-2, return_grad=True)
    assert float(to_numpy(a)) == float(to_numpy(b))


def test_matches_information_measures(xp):
    """softmax_cross_entropy with probability targets is H(P, softmax(f)) per row."""
    rng = np.random.default_rng(2)
    x, p = make_inputs(rng, (15, 8), "prob", np.float64)
    rows = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(p), reduction="none")
    h = gpuce.cross_entropy(xp.asarray(p), gpuce.softmax(xp.asarray(x)))
    np.testing.assert_allclose(to_numpy(rows), to_numpy(h), rtol=1e-12)


# ---- finite differences (float64) ------------------------------------------------------

@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_finite_differences(kind, reduction):
    rng = np.random.default_rng(13)
    x, t = make_inputs(rng, (6, 5), kind, np.float64)
    w = rng.random(5) + 0.5
    kw = dict(weight=w, label_smoothing=0.15, z_loss=0.01, reduction=reduction)

    def f(xx):
        return float(np.sum(gpuce.softmax_cross_entropy(xx, t, **kw)))

    _, grad = gpuce.softmax_cross_entropy(x, t, return_grad=True, **kw)
    h = 1e-6
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp_, xm = x.copy(), x.copy()
        xp_[idx] += h
        xm[idx] -= h
        fd[idx] = (f(xp_) - f(xm)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


# ---- properties ------------------------------------------------------------------------

finite_rows = hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
                         elements=st.floats(-50, 50))


@settings(max_examples=60, deadline=None)
@given(x=finite_rows, shift=st.floats(-100, 100), data=st.data())
def test_shift_invariance(x, shift, data):
    t = data.draw(hnp.arrays(np.int64, x.shape[:1], elements=st.integers(0, x.shape[1] - 1)))
    a = gpuce.softmax_cross_entropy(x, t, reduction="none")
    b = gpuce.softmax_cross_entropy(x + shift, t, reduction="none")
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(x=finite_rows, data=st.data())
def test_gradient_is_softmax_minus_onehot(x, data):
    n, c = x.shape
    t = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    _, grad = gpuce.softmax_cross_entropy(x, t, reduction="sum", return_grad=True)
    expect = R.softmax_rows(x)
    expect[np.arange(n), t] -= 1.0
    np.testing.assert_allclose(grad, expect, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(x=finite_rows)
def test_label_and_onehot_targets_agree(x):
    n, c = x.shape
    t = np.arange(n) % c
    onehot = np.eye(c)[t]
    a, ga = gpuce.softmax_cross_entropy(x, t, label_smoothing=0.1, return_grad=True)
    b, gb = gpuce.softmax_cross_entropy(x, onehot, label_smoothing=0.1, return_grad=True)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-12)


IMPLS = ["portable", "fused"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c", [7, 3001, 40000])
def test_gpu_is_deterministic(impl, c):
    import cupy as cp

    rng = np.random.default_rng(21)
    x, t = make_inputs(rng, (97, c), "label", np.float32)
    xd, td = cp.asarray(x), cp.asarray(t)
    a, ga = gpuce.softmax_cross_entropy(xd, td, label_smoothing=0.1, return_grad=True, impl=impl)
    b, gb = gpuce.softmax_cross_entropy(xd, td, label_smoothing=0.1, return_grad=True, impl=impl)
    assert a.get().tobytes() == b.get().tobytes()
    assert ga.get().tobytes() == gb.get().tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("c", [3, 10, 100, 257, 1000, 2048, 4099, 32768, 131072])
def test_gpu_matches_numpy_path(impl, kind, dtype, c):
    """Every fused variant (regs shapes, smem, cluster/twopass) against the NumPy path."""
    import cupy as cp

    rng = np.random.default_rng(22)
    n = max(2, min(300, 2**21 // c))
    x, t = make_inputs(rng, (n, c), kind, dtype)
    w = (rng.random(c) + 0.5).astype(np.float32)
    kw = dict(label_smoothing=0.05, z_loss=1e-3, reduction="sum")
    l_np, g_np = gpuce.softmax_cross_entropy(x, t, weight=w, return_grad=True, **kw)
    l_cp, g_cp = gpuce.softmax_cross_entropy(cp.asarray(x), cp.asarray(t), weight=cp.asarray(w),
                                             return_grad=True, impl=impl, **kw)
    rtol = {np.float16: 2e-3, np.float32: 1e-5, np.float64: 1e-10}[dtype]
    np.testing.assert_allclose(l_cp.get(), l_np, rtol=rtol)
    np.testing.assert_allclose(g_cp.get().astype(np.float64), g_np.astype(np.float64), rtol=rtol,
                               atol=rtol * 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("plain", [True, False], ids=["plain", "weighted-smoothed"])
@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("dtype", [np.float16, "bfloat16", np.float32, np.float64])
@pytest.mark.parametrize("c", [10, 32, 100, 1000, 4100, 20000, 70000, 262144])
def test_gpu_every_candidate_variant(c, dtype, kind, plain):
    """Every plan the heuristic could pick for a shape (tile, warp, block, cluster, twopass),
    pinned one by one, against the NumPy path: the benchmark times the same list, so any of
    them may become the pick.  Also the two-launch contract's outputs: loss, gradient,
    statistics and a softcap."""
    import cupy as cp

    from gpuce._cuda import fused as F
    from gpuce._cuda import sce as cuda_sce
    from gpuce._validation import bfloat16_dtype, sce_args

    dtype = bfloat16_dtype() if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(zlib.crc32(f"every-candidate-{c}-{dtype}-{kind}-{plain}".encode()))
    n = max(3, min(200, 2**20 // c))
    x, t = make_inputs(rng, (n, c), kind, np.float32)
    x = x.astype(dtype)
    if kind == "prob":
        t = t.astype(dtype)
    kw = dict(reduction="mean", ignore_index=-100, weight=None, label_smoothing=0.0, z_loss=0.0) if plain else \
        dict(reduction="sum", ignore_index=-100, weight=(rng.random(c) + 0.5).astype(np.float32),
             label_smoothing=0.05, z_loss=1e-3)
    opts = dict(softcap=None if plain else 20.0, return_stats=True)
    l_np, g_np, s_np = gpuce.softmax_cross_entropy(x, t, return_grad=True, **kw, **opts)
    xd, td = cp.asarray(x), cp.asarray(t)
    wd = None if kw["weight"] is None else cp.asarray(kw["weight"])
    a = sce_args(xd, td, return_grad=True, inplace=False, **{**kw, "weight": wd}, **opts)
    cands, _, _ = F.candidates_for(xd, kind, "int32" if kind == "prob" else td.dtype.name,
                                   td if kind == "prob" else None, cp.empty_like(xd),
                                   softcap=opts["softcap"] is not None)
    assert cands[-1].variant.kind == "twopass"  # rows no ring holds: the fallback
    rtol = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-10}[dtype.name]
    for p in cands:
        g = cp.empty_like(xd)
        out = cuda_sce.softmax_cross_entropy(xd, td, wd, a, g, "fused", p.variant)
        msg = p.describe()
        np.testing.assert_allclose(out.total.get(), l_np, rtol=rtol, err_msg=msg)
        # "mean" scales the gradient by 1/n; "sum" leaves entries up to max(w) in size, where
        # p - y cancels: a few ulps of the row's scale is the most either path can promise
        atol = rtol / n if plain else 4 * float(np.finfo(np.float16 if dtype.itemsize == 2 else dtype).eps) * \
            (8 if dtype.name == "bfloat16" else 1) * float(kw["weight"].max())
        np.testing.assert_allclose(g.get().astype(np.float64), g_np.astype(np.float64), rtol=rtol,
                                   atol=atol, err_msg=msg)
        np.testing.assert_allclose(out.stats.lse.get(), s_np.lse, rtol=rtol, err_msg=msg)
        np.testing.assert_allclose(out.stats.z_loss.get(), s_np.z_loss, rtol=rtol, atol=1e-7, err_msg=msg)
        if kind == "label":
            np.testing.assert_allclose(out.stats.accuracy.get(), s_np.accuracy, rtol=1e-6, err_msg=msg)


@pytest.mark.gpu
def test_gpu_fused_beyond_2_31_elements():
    """N*C > 2**31 (64-bit offsets): sampled rows against the NumPy path."""
    import cupy as cp

    free, _ = cp.cuda.runtime.memGetInfo()
    n, c = 16400, 131072
    if free < 2.2 * n * c * 4:
        pytest.skip(f"needs {2.2 * n * c * 4 / 2**30:.0f} GiB of free device memory")
    x = cp.random.standard_normal((n, c), dtype=cp.float32)
    t = cp.random.randint(0, c, n)
    loss, grad = gpuce.softmax_cross_entropy(x, t, reduction="none", return_grad=True, impl="fused")
    rows = np.array([0, 1, 8191, 16383, 16384, n - 2, n - 1])
    l_np, g_np = gpuce.softmax_cross_entropy(x[rows].get(), t[rows].get(), reduction="none",
                                             return_grad=True)
    np.testing.assert_allclose(loss[rows].get(), l_np, rtol=1e-5)
    np.testing.assert_allclose(grad[rows].get(), g_np, rtol=1e-5, atol=1e-9)


def test_impl_validation():
    with pytest.raises(ValueError, match="impl must be one of"):
        gpuce.softmax_cross_entropy(np.zeros((2, 3)), np.zeros(2, np.int64), impl="fast")


def test_numpy_threads_do_not_change_bits(monkeypatch):
    from gpuce import _sce_numpy

    rng = np.random.default_rng(31)
    x, t = make_inputs(rng, (700, 3000), "label", np.float32)
    kw = dict(label_smoothing=0.1, z_loss=1e-4, return_grad=True)
    monkeypatch.setattr(_sce_numpy, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(_sce_numpy, "_workers", lambda: 3)
    a, ga = gpuce.softmax_cross_entropy(x, t, **kw)
    monkeypatch.setattr(_sce_numpy, "PARALLEL_MIN_ELEMENTS", 1 << 62)
    b, gb = gpuce.softmax_cross_entropy(x, t, **kw)
    assert a.tobytes() == b.tobytes() and ga.tobytes() == gb.tobytes()


def test_strided_labels_weights_and_targets(xp):
    rng = np.random.default_rng(41)
    x = rng.standard_normal((20, 9))
    t_all = rng.integers(0, 9, 40)
    w_all = rng.random(18) + 0.5
    t, w = t_all[::2], w_all[::2]
    ref_loss, ref_grad = ref_for(x, t, "label", weight=w, label_smoothing=0.1, reduction="mean")
    loss, grad = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t_all)[::2],
                                             weight=xp.asarray(w_all)[::2], label_smoothing=0.1,
                                             return_grad=True)
    np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=1e-10)
    np.testing.assert_allclose(to_numpy(grad), ref_grad, rtol=1e-10, atol=1e-13)
    p_all = rng.random((20, 18))
    p = p_all[:, ::2] / p_all[:, ::2].sum(1, keepdims=True)
    p_dev = xp.asarray(p_all)[:, ::2]
    p_dev = p_dev / p_dev.sum(1, keepdims=True)
    ref_loss, ref_grad = ref_for(x, p, "prob", reduction="sum")
    loss, grad = gpuce.softmax_cross_entropy(xp.asarray(x), p_dev, reduction="sum", return_grad=True)
    np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=1e-10)
    np.testing.assert_allclose(to_numpy(grad), ref_grad, rtol=1e-10, atol=1e-13)


def test_semantics_table_against_torch():
    """The README's semantics table, both columns: gpuce's behaviour and torch's (CPU, float64)
    on the rows where they differ."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    inf, nan = np.inf, np.nan

    def both(x, t, **kw):
        x = np.asarray(x, np.float64)
        g_loss, g_grad = gpuce.softmax_cross_entropy(x, np.asarray(t), return_grad=True,
                                                     **{k: np.asarray(v) if isinstance(v, list) else v
                                                        for k, v in kw.items()})
        xt = torch.tensor(x, requires_grad=True)
        tk = {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v
              for k, v in kw.items()}
        t_loss = F.cross_entropy(xt, torch.tensor(t), **tk)
        t_loss.sum().backward()
        return (np.asarray(g_loss), g_grad), (t_loss.detach().numpy(), xt.grad.numpy())

    row = [[-inf, 0.5, 1.0]]
    # -inf logit with zero target mass: gpuce finite; torch finite for a hard label elsewhere...
    (gl, gg), (tl, tg) = both(row, [2])
    assert np.isfinite(gl) and np.isfinite(tl) and np.allclose(gl, tl)
    # ...but NaN for a probability of 0 on it, or a zero class weight under smoothing
    for t, kw in (([[0.0, 0.3, 0.7]], {}), ([2], dict(weight=[0.0, 1.0, 1.0], label_smoothing=0.1))):
        (gl, gg), (tl, tg) = both(row, t, **kw)
        assert np.isfinite(gl) and np.isfinite(gg).all()
        assert np.isnan(tl) and np.isfinite(tg).all()
    # target mass on the -inf logit: +inf in both
    for t, kw in (([0], {}), ([2], dict(label_smoothing=0.1))):
        (gl, _), (tl, _) = both(row, t, **kw)
        assert np.isposinf(gl) and np.isposinf(tl)
    # zero denominators: gpuce 0 with a zero gradient; torch NaN
    (gl, gg), (tl, tg) = both([[1.0, 2.0]], [-100])
    assert gl == 0 and not gg.any() and np.isnan(tl) and not tg.any()
    (gl, gg), (tl, tg) = both([[1.0, 2.0]], [0], weight=[0.0, 1.0])
    assert gl == 0 and not gg.any() and np.isnan(tl) and np.isnan(tg).all()
    # NaN row, ignored: gpuce loss 0 and zero gradient; torch loss 0 but a NaN gradient
    (gl, gg), (tl, tg) = both([[nan, 0.0, 1.0], [0.0, 1.0, 2.0]], [-100, 1], reduction="none")
    assert gl[0] == 0 and not gg[0].any() and tl[0] == 0 and np.isnan(tg[0]).all()
    np.testing.assert_allclose(gl[1], tl[1], rtol=1e-12)
    # not ignored: NaN loss and gradient in both
    for bad in ([nan, 0.0, 1.0], [inf, 0.0, 1.0], [-inf, -inf, -inf]):
        (gl, gg), (tl, tg) = both([bad], [0], reduction="none")
        assert np.isnan(gl).all() and np.isnan(gg).all() and np.isnan(tl).all() and np.isnan(tg).all()
    # ignore_index >= 0 with probabilities: ValueError here, RuntimeError in torch
    with pytest.raises(ValueError):
        both([[0.0, 1.0]], [[0.5, 0.5]], ignore_index=0)
    with pytest.raises(RuntimeError):
        F.cross_entropy(torch.zeros(1, 2, dtype=torch.float64), torch.full((1, 2), 0.5,
                        dtype=torch.float64), ignore_index=0)
    # negative class weights: the same values as torch, the mean's denominator included
    for red in ("mean", "sum", "none"):
        for eps in (0.0, 0.2):
            (gl, gg), (tl, tg) = both([[0.0, 1.0, -2.0], [3.0, 1.0, 0.5]], [0, 2],
                                      weight=[-1.0, 0.5, 2.0], reduction=red, label_smoothing=eps)
            np.testing.assert_allclose(gl, tl, rtol=1e-12)
            np.testing.assert_allclose(gg, tg, rtol=1e-12, atol=1e-15)
