"""Every row of the bad-input list, on both backends: clear exceptions, never wrong numbers."""

import numpy as np
import pytest

import gpuce
from helpers import to_numpy


def sce(xp, x, t, **kw):
    return gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), **kw)


X = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)


@pytest.mark.parametrize("bad,pos", [(5, (2,)), (-1, (2,)), (-7, (2,))])
def test_label_out_of_range_names_first_position(xp, bad, pos):
    t = np.array([0, 1, bad, 7])
    with pytest.raises(ValueError, match=rf"label {bad} at position \(2,\) is out of range"):
        sce(xp, X, t)


def test_label_error_position_is_multidimensional(xp):
    x = np.zeros((2, 3, 4), np.float32)
    t = np.zeros((2, 3), np.int64)
    t[1, 2] = 4
    with pytest.raises(ValueError, match=r"position \(1, 2\)"):
        sce(xp, x, t)


def test_ignore_index_is_not_out_of_range(xp):
    t = np.array([0, -100, 4, -100])
    assert np.isfinite(to_numpy(sce(xp, X, t)))


def test_float_labels_wrong_shape(xp):
    with pytest.raises(ValueError, match="probability targets"):
        sce(xp, X, np.zeros((4,), np.float32))
    with pytest.raises(ValueError, match="probability targets"):
        sce(xp, X, np.zeros((4, 6), np.float32))


def test_integer_labels_wrong_shape(xp):
    with pytest.raises(ValueError, match="integer labels must have shape"):
        sce(xp, X, np.zeros((5,), np.int64))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_])
def test_integer_logits_type_error(xp, dtype):
    with pytest.raises(TypeError, match="logits must be float16, bfloat16, float32 or float64"):
        sce(xp, X.astype(dtype), np.zeros(4, np.int64))


def test_bool_target_type_error(xp):
    with pytest.raises(TypeError, match="target must be"):
        sce(xp, X, np.zeros(4, bool))


def test_unknown_reduction_lists_allowed(xp):
    with pytest.raises(ValueError, match="'none', 'sum', 'mean'.*'avg'"):
        sce(xp, X, np.zeros(4, np.int64), reduction="avg")


@pytest.mark.parametrize("wshape", [(4,), (6,), (5, 1)])
def test_weight_wrong_length(xp, wshape):
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\)"):
        sce(xp, X, np.zeros(4, np.int64), weight=xp.ones(wshape, np.float32))


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan")])
def test_label_smoothing_out_of_range(xp, eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        sce(xp, X, np.zeros(4, np.int64), label_smoothing=eps)


@pytest.mark.parametrize("z", [-1e-4, float("inf")])
def test_bad_z_loss(xp, z):
    with pytest.raises(ValueError, match="z_loss"):
        sce(xp, X, np.zeros(4, np.int64), z_loss=z)


def test_inplace_needs_return_grad(xp):
    with pytest.raises(ValueError, match="return_grad"):
        sce(xp, X, np.zeros(4, np.int64), inplace=True)


def test_non_negative_ignore_index_with_probabilities(xp):
    p = np.full((4, 5), 0.2, np.float32)
    with pytest.raises(ValueError, match="ignore_index"):
        sce(xp, X, p, ignore_index=0)


def test_zero_classes(xp):
    with pytest.raises(ValueError, match="at least one class"):
        sce(xp, np.zeros((3, 0), np.float32), np.zeros(3, np.int64))


def test_readonly_logits_inplace_numpy():
    x = X.copy()
    x.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        gpuce.softmax_cross_entropy(x, np.zeros(4, np.int64), return_grad=True, inplace=True)


def test_bad_label_does_not_write_inplace(xp):
    x = xp.asarray(X.copy())
    with pytest.raises(ValueError):
        gpuce.softmax_cross_entropy(x, xp.asarray([0, 1, 9, 0]), return_grad=True, inplace=True)
    np.testing.assert_array_equal(to_numpy(x), X)


@pytest.mark.gpu
def test_mixed_numpy_cupy_type_error():
    import cupy

    with pytest.raises(TypeError, match="cupy.ndarray.*numpy.ndarray"):
        gpuce.softmax_cross_entropy(cupy.asarray(X), np.zeros(4, np.int64))
    with pytest.raises(TypeError, match="cannot mix"):
        gpuce.kl_div(cupy.asarray(X), X)


@pytest.mark.parametrize("fn", [gpuce.softmax, gpuce.log_softmax, gpuce.logsumexp])
def test_softmax_family_rejects_integers(xp, fn):
    with pytest.raises(TypeError):
        fn(xp.arange(6).reshape(2, 3))


@pytest.mark.parametrize("fn", [gpuce.softmax, gpuce.logsumexp])
def test_softmax_family_bad_axis(xp, fn):
    with pytest.raises(ValueError, match="out of bounds"):
        fn(xp.asarray(X), axis=2)


def test_information_shape_mismatch(xp):
    with pytest.raises(ValueError, match="same shape"):
        gpuce.kl_div(xp.ones((2, 3)), xp.ones((2, 4)))


# ---- uint64 labels, class weights, aliasing with inplace=True ---------------

@pytest.mark.parametrize("big", [2**63, 2**64 - 1])
def test_uint64_label_above_int64_quotes_callers_value(xp, big):
    """Not wrapped to a negative label (here it would equal ignore_index=-1 and be skipped)."""
    t = np.array([0, 1, big, 3], np.uint64)
    with pytest.raises(ValueError, match=rf"label {big} at position \(2,\) is out of range"):
        sce(xp, X, t, ignore_index=-1)
    with pytest.raises(ValueError, match=rf"label {big} at position \(2,\)"):
        gpuce.softmax_cross_entropy(xp.asarray(X), xp.asarray(t), ignore_index=-1,
                                    return_grad=True, reduction="none")


def test_uint64_labels_in_range_work(xp):
    t = np.array([0, 4, 2, 3])
    a = to_numpy(sce(xp, X, t.astype(np.uint64), reduction="none"))
    b = to_numpy(sce(xp, X, t, reduction="none"))
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_bad_class_weight(xp, bad):
    w = np.ones(5, np.float32)
    w[3] = bad
    with pytest.raises(ValueError, match=r"class weights must be finite, got weight\[3\]"):
        sce(xp, X, np.array([0, 1, 2, 4]), weight=xp.asarray(w))


@pytest.mark.parametrize("wdtype", [np.int64, np.float32])
def test_negative_and_zero_class_weights_are_accepted(xp, wdtype):
    """Negative and zero class weights are weights like any other, as in torch: the loss is
    Σ w_k L_k / Σ w_k over the rows (checked against float64 written out here)."""
    w = np.array([1, 3, -2, 0, 1], wdtype)
    t = np.array([0, 1, 2, 4])
    x64 = X.astype(np.float64)
    lse = np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1)) + x64.max(1)
    nll = lse - x64[np.arange(4), t]
    want = (w[t] * nll).sum() / w[t].sum()
    got = float(to_numpy(sce(xp, X, t, weight=xp.asarray(w))))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def _sce_inplace(x, t, **kw):
    return gpuce.softmax_cross_entropy(x, t, return_grad=True, inplace=True, **kw)


def test_inplace_refuses_target_sharing_logits(xp):
    x = xp.asarray(X.copy())
    before = to_numpy(x).copy()
    with pytest.raises(ValueError, match="target that does not share memory with the logits"):
        _sce_inplace(x, x)  # probability target = the logits themselves
    buf = xp.asarray(np.concatenate([X, np.full((4, 5), 0.2, np.float32)]))
    with pytest.raises(ValueError, match="target that does not share"):
        _sce_inplace(buf[:4], buf[2:6])  # overlapping views of one buffer
    np.testing.assert_array_equal(to_numpy(x), before)
    xw = xp.asarray(np.abs(X))  # non-negative, so row 1 is a valid class weight
    with pytest.raises(ValueError, match="weight that does not share memory with the logits"):
        _sce_inplace(xw, xp.asarray([0, 1, 2, 3]), weight=xw[1])
    np.testing.assert_array_equal(to_numpy(xw), np.abs(X))
    # without inplace the same aliasing is harmless (nothing is written)
    loss = gpuce.softmax_cross_entropy(x, xp.asarray([0, 1, 2, 3]), weight=xp.abs(x[1]))
    assert np.isfinite(to_numpy(loss))


def test_inplace_label_view_of_logits_refused_numpy():
    """Integer labels can alias float logits only through a dtype view (NumPy)."""
    x = np.zeros((4, 2), np.float64)
    t = x[:, 0].view(np.int64)  # labels 0, stored in the logits' buffer
    with pytest.raises(ValueError, match="target that does not share"):
        _sce_inplace(x, t)


def test_inplace_disjoint_views_of_one_buffer_allowed(xp):
    """The check is on shared elements, not on a shared allocation."""
    p = np.full((4, 5), 0.2, np.float32)
    buf = xp.asarray(np.concatenate([X, p]))
    loss, grad = _sce_inplace(buf[:4], buf[4:])
    ref_loss, ref_grad = gpuce.softmax_cross_entropy(X, p, return_grad=True)
    np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(buf[:4]), ref_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(to_numpy(buf[4:]), p)


def test_linear_scalar_y(xp):
    Xl, W = xp.zeros((3, 2)), xp.zeros((4, 2))
    with pytest.raises(ValueError, match=r"y must be \(N,\) integer labels or \(N, C\) probabilities"):
        gpuce.linear_cross_entropy(Xl, W, 1)
    with pytest.raises(ValueError, match="y must be"):
        gpuce.linear_cross_entropy(Xl, W, xp.asarray(1))
    with pytest.raises(ValueError, match="y must be"):
        gpuce.linear_cross_entropy(Xl, W, xp.zeros((3, 4, 1)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_uint64_label_above_int64(xp, reduction):
    """Raised before the mean's denominator (which would have counted the wrapped row)."""
    rng = np.random.default_rng(12)
    Xl, W = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    y = np.array([0, 2**64 - 1, 3, 1], np.uint64)
    with pytest.raises(ValueError, match=rf"label {2**64 - 1} at position \(1,\)"):
        gpuce.linear_cross_entropy(xp.asarray(Xl), xp.asarray(W), xp.asarray(y), ignore_index=-1,
                                   reduction=reduction, return_grad=True, chunk_size=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_linear_bad_class_weight(xp, bad):
    w = np.ones(5)
    w[0] = bad
    with pytest.raises(ValueError, match=r"class weights must be finite, got weight\[0\]"):
        gpuce.linear_cross_entropy(xp.zeros((3, 2)), xp.zeros((5, 2)), xp.asarray([0, 1, 2]),
                                   weight=xp.asarray(w))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_uint64_labels_in_range_work(xp, reduction):
    rng = np.random.default_rng(13)
    Xl, W = rng.standard_normal((6, 3)), rng.standard_normal((4, 3))
    y = np.array([0, 1, 3, 2, 1, 0])
    w = xp.asarray(np.array([1.0, 2.0, 3.0, 4.0]))
    a = gpuce.linear_cross_entropy(xp.asarray(Xl), xp.asarray(W), xp.asarray(y.astype(np.uint64)),
                                   weight=w, reduction=reduction, chunk_size=4)
    b = gpuce.linear_cross_entropy(xp.asarray(Xl), xp.asarray(W), xp.asarray(y), weight=w,
                                   reduction=reduction, chunk_size=4)
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


# ---- byte order and bool axes ---------------------------------------------------------------

@pytest.mark.parametrize("order", [">", "<"])
def test_byte_swapped_floats_are_read_as_their_values(order):
    """NumPy arrays of either byte order (``x.astype(">f8")``) give the native results: the
    logits, the probability targets, the class weights, and every row-wise function."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 7))
    p = rng.random((6, 7))
    p /= p.sum(1, keepdims=True)
    w = rng.random(7) + 0.5
    y = rng.integers(0, 7, 6)
    sw = {k: v.astype(order + "f8") for k, v in dict(x=x, p=p, w=w).items()}
    for target, native_target in ((y, y), (sw["p"], p)):
        got = gpuce.softmax_cross_entropy(sw["x"], target, weight=sw["w"], return_grad=True)
        want = gpuce.softmax_cross_entropy(x, native_target, weight=w, return_grad=True)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    for name in ("softmax", "log_softmax", "logsumexp"):
        np.testing.assert_array_equal(getattr(gpuce, name)(sw["x"].astype(order + "f4")),
                                      getattr(gpuce, name)(x.astype(np.float32)))
    for name, args, native in (("entropy", (sw["p"],), (p,)),
                               ("cross_entropy", (sw["p"], sw["p"]), (p, p)),
                               ("kl_div", (sw["p"], sw["p"]), (p, p))):
        np.testing.assert_array_equal(getattr(gpuce, name)(*args), getattr(gpuce, name)(*native))
    X, W = rng.standard_normal((5, 3)), rng.standard_normal((7, 3))
    np.testing.assert_array_equal(
        gpuce.linear_cross_entropy(X.astype(order + "f8"), W.astype(order + "f8"), y[:5]),
        gpuce.linear_cross_entropy(X, W, y[:5]))


def test_byte_swapped_logits_in_place_are_refused():
    x = np.zeros((2, 3)).astype(">f8" if np.little_endian else "<f8")
    with pytest.raises(ValueError, match="native byte order"):
        gpuce.softmax_cross_entropy(x, np.array([0, 1]), return_grad=True, inplace=True)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp", "entropy"])
@pytest.mark.parametrize("axis", [True, False, np.bool_(True)])
def test_bool_axis_is_a_type_error(xp, name, axis):
    x = xp.asarray(np.full((3, 4), 0.25, np.float32))
    with pytest.raises(TypeError, match="axis must be an integer, got bool"):
        getattr(gpuce, name)(x, axis=axis)
