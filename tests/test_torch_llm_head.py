"""gpuce.torch's LLM-head options (softcap, return_stats, check_labels) against a float64
torch implementation written here (tanh, then F.cross_entropy; z-loss, accuracy and lse
from their definitions), eager and under torch.compile(fullgraph=True)."""

import itertools
import math
import zlib

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import gpuce  # noqa: E402
import gpuce.torch as gt  # noqa: E402
from helpers import torch_devices, torch_inputs  # noqa: E402


def devices():
    return torch_devices(torch)


def gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()) % 100_000)


def tensors(g, n, c, kind, extra=(), dtype=torch.float64, device="cpu"):
    x, t = torch_inputs(torch, g, n, c, kind, scale=4, dtype=dtype, device=device, extra=extra)
    return x.requires_grad_(), t


def reference(x, t, *, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0,
              softcap=None, ignore_index=-100):
    """(loss, SceStats) in float64 from torch: g = s tanh(x / s), F.cross_entropy on g, plus
    z lse(g)^2 per non-ignored row ("mean" divides it by their count, the rest by the
    weight sum); the statistics written from their definitions."""
    x = x.double()
    g = softcap * torch.tanh(x / softcap) if softcap else x
    w = None if weight is None else weight.double()
    ce = F.cross_entropy(g, t.double() if t.is_floating_point() else t, weight=w,
                         reduction="none", ignore_index=ignore_index,
                         label_smoothing=label_smoothing)
    lse = torch.logsumexp(g, dim=1)
    label = not t.is_floating_point()
    if label:
        active = t != ignore_index
        safe = torch.where(active, t, 0)
        denom = (active.double() * (w[safe] if w is not None else 1.0)).sum()
        m = g.amax(1)
        correct = (g.gather(1, safe.unsqueeze(1)).squeeze(1) == m) & torch.isfinite(m) \
            & ~torch.isnan(g).any(1)
        acc_rows = torch.where(active, correct.double(), math.nan)
        counted = active.sum()
        accuracy = correct[active].double().sum() / counted if counted else torch.tensor(math.nan)
    else:
        active = torch.ones_like(lse, dtype=torch.bool)
        denom = torch.tensor(float(lse.numel()), dtype=torch.float64)
        acc_rows = accuracy = None
    z_rows = torch.where(active, z_loss * lse * lse, 0.0)
    rows = ce + z_rows
    predicted = torch.where(torch.isnan(g).any(1), -1, g.argmax(1))  # first maximum, as torch
    if reduction == "none":
        return rows, gpuce.SceStats(z_rows, acc_rows, lse, predicted)
    if reduction == "sum":
        return rows.sum(), gpuce.SceStats(z_rows.sum(), accuracy, lse, predicted)
    if denom == 0:  # gpuce's zero-denominator rule
        return rows.sum() * 0.0, gpuce.SceStats(z_rows.sum() * 0.0, accuracy, lse, predicted)
    # "mean": the cross-entropy part over the weight sum, z-loss over the non-ignored rows
    z_mean = z_rows.sum() / active.sum()
    return ce.sum() / denom + z_mean, gpuce.SceStats(z_mean, accuracy, lse, predicted)


def assert_stats(got, want, rtol, atol):
    assert isinstance(got, gpuce.SceStats)
    for name, g, w in zip(got._fields, got, want):
        assert (g is None) == (w is None)
        if w is not None:
            if name != "lse":  # lse is differentiable (tests/test_torch_lse_grad.py)
                assert not g.requires_grad  # the other statistics carry no gradient
            if name == "predicted":
                assert g.dtype == torch.int64
                torch.testing.assert_close(g, w, rtol=0, atol=0)
            else:
                torch.testing.assert_close(g.double(), w.detach().double(), rtol=rtol,
                                           atol=atol, equal_nan=True)


OPTS = list(itertools.product(["label", "prob"], ["mean", "sum", "none"], [False, True],
                              [0.0, 0.1], [None, 3.0]))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind,reduction,weighted,smoothing,softcap", OPTS)
def test_matches_torch_reference(device, kind, reduction, weighted, smoothing, softcap):
    g = gen("ref", kind, reduction, weighted, smoothing, softcap)
    x, t = tensors(g, 23, 9, kind, extra=(3,), device=device)
    w = (torch.rand(9, generator=g, dtype=torch.float64) + 0.5).to(device) if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=smoothing, z_loss=1e-2,
              softcap=softcap)
    loss, st = gt.cross_entropy(x, t, return_stats=True, **kw)
    want, want_st = reference(x, t, **kw)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    assert st.lse.shape == want.shape if reduction == "none" else st.lse.shape == (23, 3)
    assert_stats(st, want_st, 1e-10, 1e-12)
    go = torch.rand(want.shape, generator=g, dtype=torch.float64).to(device) + 0.5
    (got_g,) = torch.autograd.grad(loss, x, go)
    (want_g,) = torch.autograd.grad(want, x, go)
    torch.testing.assert_close(got_g, want_g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_target_and_weight_grads_with_softcap(device, reduction):
    """The backward operator forms log q of the capped logits for these gradients."""
    g = gen("target grads", reduction)
    x, p = tensors(g, 11, 6, "prob", device=device)
    p.requires_grad_()
    w = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    kw = dict(reduction=reduction, label_smoothing=0.1, softcap=2.0)
    got = gt.cross_entropy(x, p, w, **kw)
    want, _ = reference(x, p, weight=w, **kw)
    go = torch.ones_like(want)
    for a, b in zip(torch.autograd.grad(got, (x, p, w), go), torch.autograd.grad(want, (x, p, w), go)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lower_precision(device, dtype):
    x, t = tensors(gen("dtype", str(dtype)), 64, 50, "label", dtype=dtype, device=device)
    loss, st = gt.cross_entropy(x, t, softcap=30.0, z_loss=1e-3, return_stats=True)
    want, want_st = reference(x, t, softcap=30.0, z_loss=1e-3)
    assert loss.dtype == dtype and st.z_loss.dtype == dtype
    assert st.lse.dtype == st.accuracy.dtype == torch.float32
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(loss.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(st.lse.double(), want_st.lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind,reduction", list(itertools.product(["label", "prob"],
                                                                  ["mean", "sum", "none"])))
def test_linear_matches_torch_reference(device, kind, reduction):
    g = gen("linear", kind, reduction)
    n, d, c = 19, 5, 8
    X = torch.randn(n, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    W = torch.randn(c, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(c, generator=g, dtype=torch.float64).to(device).requires_grad_()
    _, t = tensors(g, n, c, kind, device=device)
    kw = dict(reduction=reduction, label_smoothing=0.05, z_loss=1e-2, softcap=2.5)
    want, want_st = reference(F.linear(X, W, b), t, **kw)
    go = torch.rand(want.shape, generator=g, dtype=torch.float64).to(device) + 0.5
    want_g = torch.autograd.grad(want, (X, W, b), go)
    for chunk in (None, 4):
        loss, st = gt.linear_cross_entropy(X, W, t, linear_bias=b, chunk_size=chunk, return_stats=True, **kw)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
        assert_stats(st, want_st, 1e-10, 1e-12)
        for a, r in zip(torch.autograd.grad(loss, (X, W, b), go), want_g):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    if kind == "prob":  # target gradient: log q of the capped logits, chunk by chunk
        p = t.clone().requires_grad_()
        got = gt.linear_cross_entropy(X, W, p, linear_bias=b, chunk_size=4, **kw)
        ref, _ = reference(F.linear(X, W, b), p, **kw)
        torch.testing.assert_close(torch.autograd.grad(got, p, go)[0],
                                   torch.autograd.grad(ref, p, go)[0], rtol=1e-10, atol=1e-12)


def test_check_labels_false_gives_nan_rows():
    x, t = tensors(gen("check_labels"), 10, 5, "label")
    t[4] = 5
    with pytest.raises(ValueError, match="label 5 at position"):
        gt.cross_entropy(x, t)
    loss = gt.cross_entropy(x, t, reduction="none", check_labels=False)
    assert torch.isnan(loss[4]) and torch.isfinite(torch.cat([loss[:4], loss[5:]])).all()
    (gx,) = torch.autograd.grad(loss.nan_to_num().sum(), x)
    assert torch.isnan(gx[4]).all() and torch.isfinite(torch.cat([gx[:4], gx[5:]])).all()
    X, W = torch.randn(10, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    assert torch.isnan(gt.linear_cross_entropy(X, W, t, check_labels=False))


def test_modules_and_bad_options():
    x, t = tensors(gen("modules"), 6, 4, "label")
    loss, st = gt.CrossEntropyLoss(softcap=2.0, return_stats=True)(x, t)
    want, want_st = reference(x, t, softcap=2.0)
    torch.testing.assert_close(loss, want)
    assert_stats(st, want_st, 1e-10, 1e-12)
    X, W = torch.randn(6, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    head = gt.LinearCrossEntropyLoss(3, 4, softcap=2.0, return_stats=True, dtype=torch.float64)
    with torch.no_grad():
        head.linear.weight.copy_(W)
    loss, st = head(X, t)
    torch.testing.assert_close(loss, reference(F.linear(X, W), t, softcap=2.0)[0])
    for bad, err in ((0.0, ValueError), (-2.0, ValueError), (math.nan, ValueError),
                     (math.inf, ValueError), (True, TypeError)):
        with pytest.raises(err, match="softcap"):
            gt.cross_entropy(x, t, softcap=bad)
        with pytest.raises(err, match="softcap"):
            gt.linear_cross_entropy(X, W, t, softcap=bad)
        with pytest.raises(err, match="softcap"):
            gt.CrossEntropyLoss(softcap=bad)
    with pytest.raises(TypeError, match="return_stats"):
        gt.cross_entropy(x, t, return_stats="yes")


def test_opcheck_with_the_new_arguments():
    from torch.library import opcheck

    ops = torch.ops.gpuce
    g = gen("opcheck")
    x, t = tensors(g, 5, 4, "label")
    x2, p = tensors(g, 5, 4, "prob")
    w = torch.rand(4, dtype=torch.float64, generator=g) + 0.5
    for args in [(x, t, w, "mean", -100, 0.1, 0.01, True, 2.0, True, True),
                 # no ignored row: opcheck compares outputs without equal_nan, and an ignored
                 # row's accuracy is NaN with reduction="none"
                 (x, t.clamp(min=0), None, "none", -100, 0.0, 0.0, False, 0.0, True, False),
                 (x2, p, w, "sum", -100, 0.1, 0.0, True, 3.0, True, True)]:
        opcheck(ops.cross_entropy.default, args)
    opcheck(ops.cross_entropy_backward.default,
            (torch.tensor(0.7, dtype=torch.float64), x.detach(), p, w, "mean", -100, 0.1, 0.0,
             True, True, True, 2.0, True))
    X = torch.randn(6, 3, dtype=torch.float64, generator=g).requires_grad_()
    W = torch.randn(4, 3, dtype=torch.float64, generator=g).requires_grad_()
    y = torch.randint(0, 4, (6,), generator=g)  # none ignored (see above)
    for args in [(X, W, y, None, w, "mean", -100, 0.1, 0.01, None, True, True, 2.0, True, True),
                 (X, W, y, None, None, "none", -100, 0.0, 0.0, 4, True, False, 2.0, True, False)]:
        opcheck(ops.linear_cross_entropy.default, args)
    opcheck(ops.linear_cross_entropy_backward.default,
            (torch.linspace(0.5, 1.5, 6, dtype=torch.float64), X.detach(), W.detach(), y, None,
             None, "none", -100, 0.0, 0.0, None, True, 2.0, True))


def test_compiled_matches_eager():
    """torch.compile(fullgraph=True) over the options: the statistics come out of the opaque
    operator as a SceStats of tensors, equal to eager."""
    x, t = tensors(gen("compile"), 12, 7, "label")

    def fn(x, t):
        loss, st = gt.cross_entropy(x, t, softcap=3.0, z_loss=1e-3, return_stats=True)
        return loss - st.z_loss, st.accuracy, st.lse

    def lfn(X, W, t):
        loss, st = gt.linear_cross_entropy(X, W, t, softcap=3.0, return_stats=True,
                                           reduction="none")
        return loss.sum(), st.accuracy, st.lse

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="inductor")(x, t)
    want = fn(x, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)
    (ga,) = torch.autograd.grad(got[0], x)
    (gb,) = torch.autograd.grad(want[0], x)
    torch.testing.assert_close(ga, gb)
    ref, _ = reference(x, t, softcap=3.0)
    torch.testing.assert_close(got[0], ref)  # loss - z_loss: the loss without it
    X = torch.randn(12, 4, dtype=torch.float64, generator=gen("cX")).requires_grad_()
    W = torch.randn(7, 4, dtype=torch.float64, generator=gen("cW")).requires_grad_()
    got = torch.compile(lfn, fullgraph=True, backend="inductor")(X, W, t)
    want = lfn(X, W, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)
    ga = torch.autograd.grad(got[0], (X, W))
    gb = torch.autograd.grad(want[0], (X, W))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_gradcheck_with_softcap():
    x, t = tensors(gen("gradcheck"), 4, 5, "label")
    x2, p = tensors(gen("gradcheck p"), 4, 5, "prob")
    p.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: gt.cross_entropy(v, t, softcap=2.0, z_loss=0.05, label_smoothing=0.1), (x,))
    assert torch.autograd.gradcheck(
        lambda v, q: gt.cross_entropy(v, q, softcap=2.0, reduction="none"), (x2, p))
    X = torch.randn(4, 3, dtype=torch.float64, generator=gen("gX")).requires_grad_()
    W = torch.randn(5, 3, dtype=torch.float64, generator=gen("gW")).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: gt.linear_cross_entropy(a, b, t, softcap=1.5, chunk_size=3), (X, W))
