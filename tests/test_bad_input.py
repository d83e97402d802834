"""Every row of the bad-input list, on both backends: clear exceptions, never wrong numbers."""

import numpy as np
import pytest

import gpuce
from conftest import to_numpy


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
    with pytest.raises(TypeError, match="logits must be float16, float32 or float64"):
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
