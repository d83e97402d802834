"""gpuce._rowterms: a row's loss and gradient terms, one statement for the NumPy path and
gpuce.torch.  Against float64 references (the loss written out directly, its derivatives by
torch's autograd in float64), the same bits on NumPy arrays and torch tensors where the
arithmetic is elementwise, the accumulation dtype explicit for 16-bit inputs, and both users
calling it."""

import numpy as np
import pytest

import gpuce
from gpuce import _rowterms as terms
from helpers import BFLOAT16, rng_for

torch = pytest.importorskip("torch")

from gpuce.torch._autograd import _TensorOps  # noqa: E402

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
TORCH_ACC = {F32: torch.float32, F64: torch.float64}


def row_case(seed, n=9, c=6):
    rng = rng_for("rowterms", seed)
    v = rng.standard_normal((n, c)) * 3
    y = rng.random((n, c))
    y /= y.sum(1, keepdims=True)
    w = rng.random(c) + 0.5
    k = rng.integers(0, c, n)
    return v, y, w, k


def reference_loss(v, y, w, k, eps, z, kind):
    """L per row in float64 from the definition: −Σ_j target_j w_j log q_j + z lse², the
    target smoothed (class index: one-hot)."""
    c = v.shape[1]
    lse = np.log(np.exp(v - v.max(1, keepdims=True)).sum(1)) + v.max(1)
    log_q = v - lse[:, None]
    onehot = np.eye(c)[k] if kind == "label" else y
    p = (1 - eps) * onehot + eps / c
    return -(p * w * log_q).sum(1) + z * lse ** 2


def terms_of(ops, xp, v, y, w, k, eps, z, kind):
    """The row's loss and logit gradient from _rowterms (shifted values, as the NumPy path
    forms them), in ops' accumulation dtype."""
    n, c = v.shape
    m = v.amax(1) if xp is torch else v.max(1)
    e = v - m[:, None]
    s = xp.exp(e).sum(1)
    ls = xp.log(s)
    lse = m + ls
    rows = xp.arange(n)
    if kind == "label":
        wl = terms.label_coefficients(ops, w[k], eps)
        coef = terms.smoothing_coefficients(ops, w, eps, c)
        coef = ops.full(c, 0.0) if coef is None else coef
        t = e[rows, k]
    else:
        wl = ops.full(n, 0.0)
        coef = terms.target_coefficients(ops, y, w, eps, c)
        t = ops.full(n, 0.0)
    coef2 = coef[None, :] if coef.ndim == 1 else coef
    a = coef2.sum(1) * ops.full(n, 1.0)
    b = (coef2 * e).sum(1)
    loss = terms.row_loss(ops, wl, t, ls, a, b, terms.z_term(ops, z, lse))
    g = terms.logit_grad_factor(ops, wl, a, z, lse)
    grad = xp.exp(e) / s[:, None] * g[:, None] - coef2
    if kind == "label":
        grad[rows, k] -= wl
    return loss, grad


def numpy_ops(acc):
    return terms.ArrayOps(np, acc)


def torch_ops(acc):
    return _TensorOps(TORCH_ACC[np.dtype(acc)], torch.device("cpu"))


@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("eps,z", [(0.0, 0.0), (0.1, 1e-2), (1.0, 0.5)])
def test_loss_and_logit_gradient_match_float64_references(kind, eps, z):
    v, y, w, k = row_case(kind)
    want = reference_loss(v, y, w, k, eps, z, kind)
    vt = torch.tensor(v, requires_grad=True)
    c = v.shape[1]
    onehot = torch.eye(c, dtype=torch.float64)[torch.tensor(k)]
    p = (1 - eps) * (onehot if kind == "label" else torch.tensor(y)) + eps / c
    lse = torch.logsumexp(vt, 1)
    ref = -(p * torch.tensor(w) * torch.log_softmax(vt, 1)).sum(1) + z * lse ** 2
    (want_grad,) = torch.autograd.grad(ref.sum(), vt)
    np.testing.assert_allclose(ref.detach().numpy(), want, rtol=1e-13)
    for acc, tol in ((F64, 1e-12), (F32, 2e-6)):
        loss, grad = terms_of(numpy_ops(acc), np, v.astype(acc), y.astype(acc), w.astype(acc),
                              k, eps, z, kind)
        assert loss.dtype == acc and grad.dtype == acc
        np.testing.assert_allclose(loss, want, rtol=tol, atol=tol)
        np.testing.assert_allclose(grad, want_grad.numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("acc", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", ["label", "prob"])
def test_same_bits_on_numpy_and_torch(acc, kind):
    """The elementwise terms (coefficients, loss, G, the target gradient) are the same bits
    on NumPy arrays and torch tensors; the row and column sums (their order is the
    library's) agree to rounding."""
    v, y, w, k = row_case(("bits", kind))
    args = [a.astype(acc) for a in (v, y, w)]
    no, to = numpy_ops(acc), torch_ops(acc)
    got_np = terms_of(no, np, *args, k, 0.1, 1e-2, kind)
    got_t = terms_of(to, torch, *(torch.from_numpy(a) for a in args), torch.from_numpy(k),
                     0.1, 1e-2, kind)
    tol = 1e-6 if acc == F32 else 1e-14
    for a, b in zip(got_np, got_t):
        assert b.dtype == TORCH_ACC[acc]
        np.testing.assert_allclose(b.numpy(), a, rtol=tol, atol=tol)
    ya = args[1]
    for fn, call_args in ((terms.smoothed_target, (0.15, 6)),
                          (terms.target_coefficients, (args[2], 0.15, 6))):
        a = fn(no, ya, *call_args)
        b = fn(to, torch.from_numpy(ya), *(torch.from_numpy(x) if isinstance(x, np.ndarray)
                                           else x for x in call_args))
        np.testing.assert_array_equal(b.numpy(), a)
    np.testing.assert_array_equal(
        terms.label_coefficients(to, torch.from_numpy(args[2]), 0.3).numpy(),
        terms.label_coefficients(no, args[2], 0.3))
    log_q = v - np.log(np.exp(v).sum(1, keepdims=True))
    A = (-log_q * np.linspace(0.5, 1.5, v.shape[0])[:, None]).astype(acc)
    dt_np, dw_np = terms.soft_target_grads(no, A, ya, args[2], 0.2, True, True)
    dt_t, dw_t = terms.soft_target_grads(to, torch.from_numpy(A), torch.from_numpy(ya),
                                         torch.from_numpy(args[2]), 0.2, True, True)
    np.testing.assert_array_equal(dt_t.numpy(), dt_np)
    np.testing.assert_allclose(dw_t.numpy(), dw_np, rtol=tol, atol=tol)


def test_soft_target_grads_match_float64_autograd():
    """∂L/∂y and ∂L/∂w of Σ_i σ_i L_i (probabilities, smoothing, weights) against torch's
    autograd of the loss written out in float64."""
    v, y, w, _ = row_case("soft")
    eps, c = 0.2, v.shape[1]
    sigma = torch.linspace(0.5, 1.5, v.shape[0], dtype=torch.float64)
    yt, wt = torch.tensor(y, requires_grad=True), torch.tensor(w, requires_grad=True)
    log_q = torch.log_softmax(torch.tensor(v), 1)
    loss = -(((1 - eps) * yt + eps / c) * wt * log_q).sum(1)
    want_y, want_w = torch.autograd.grad((loss * sigma).sum(), (yt, wt))
    for acc, tol in ((F64, 1e-13), (F32, 2e-6)):
        ops = numpy_ops(acc)
        A = (-log_q * sigma[:, None]).numpy().astype(acc)
        d_y, d_w = terms.soft_target_grads(ops, A, y.astype(acc), w.astype(acc), eps, True, True)
        assert d_y.dtype == acc and d_w.dtype == acc and d_w.shape == (c,)
        np.testing.assert_allclose(d_y, want_y.numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(d_w, want_w.numpy(), rtol=tol, atol=tol)
        assert terms.soft_target_grads(ops, A, y, None, eps, False, False) == (None, None)


@pytest.mark.parametrize("half", [np.float16, BFLOAT16], ids=["float16", "bfloat16"])
def test_16bit_targets_are_widened_first(half):
    """A 16-bit target's coefficients are formed in float32 from its exact float32 value, on
    NumPy (ml_dtypes' bfloat16 too) and torch alike, never in the 16-bit dtype."""
    _, y, w, _ = row_case("half")
    yh = y.astype(half)
    y32 = yh.astype(np.float32)
    want = (y32 * np.float32(1 - 0.1) + np.float32(0.1 / 6)) * w.astype(np.float32)
    got = terms.target_coefficients(numpy_ops(F32), yh, w.astype(np.float32), 0.1, 6)
    assert got.dtype == F32
    np.testing.assert_array_equal(got, want)
    tdt = torch.float16 if half is np.float16 else torch.bfloat16
    yt = torch.from_numpy(y32).to(tdt)  # exact: y32 holds 16-bit values
    got_t = terms.target_coefficients(torch_ops(F32), yt, torch.from_numpy(w.astype(np.float32)),
                                      0.1, 6)
    assert got_t.dtype == torch.float32
    np.testing.assert_array_equal(got_t.numpy(), want)


def test_scalars_are_rounded_to_the_accumulation_dtype():
    assert torch_ops(F32).scalar(0.1) == float(np.float32(0.1)) != 0.1
    assert torch_ops(F64).scalar(0.1) == 0.1
    assert numpy_ops(F32).scalar(0.1).dtype == F32
    assert terms.smoothing_coefficients(numpy_ops(F32), None, 0.0, 4) is None
    np.testing.assert_array_equal(terms.smoothing_coefficients(numpy_ops(F32), None, 0.4, 4),
                                  np.full(4, np.float32(0.1)))
    assert terms.z_term(numpy_ops(F32), 0.0, np.ones(3, F32)) == 0


def test_the_numpy_path_and_gpuce_torch_both_use_it(monkeypatch):
    """gpuce.softmax_cross_entropy (NumPy) and gpuce.torch's probability-target backward
    both form their terms through _rowterms."""
    seen = []
    real = terms.smoothed_target

    def spy(ops, *args, **kwargs):
        seen.append(type(ops).__name__)
        return real(ops, *args, **kwargs)
    monkeypatch.setattr(terms, "smoothed_target", spy)
    import gpuce.torch as gt

    v, y, w, _ = row_case("users")
    gpuce.softmax_cross_entropy(v, y, weight=w, label_smoothing=0.1)
    assert seen == ["ArrayOps"]
    yt, wt = torch.tensor(y, requires_grad=True), torch.tensor(w, requires_grad=True)
    gt.cross_entropy(torch.tensor(v), yt, weight=wt, label_smoothing=0.1).backward()
    assert seen == ["ArrayOps", "ArrayOps", "_TensorOps"]  # forward (NumPy), then backward
