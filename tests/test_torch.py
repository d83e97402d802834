"""gpuce.torch against torch's own cross_entropy (CPU tensors here; CUDA tensors on a GPU)."""

import itertools
import zlib

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import gpuce.torch as gt  # noqa: E402


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return out


def tensors(seed, n, c, kind, dtype=torch.float64, device="cpu", extra=()):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((n, c) + extra, generator=g, dtype=torch.float64) * 3).to(dtype)
    if kind == "label":
        t = torch.randint(0, c, (n,) + extra, generator=g)
        t[torch.rand(t.shape, generator=g) < 0.2] = -100
    else:
        t = torch.rand((n, c) + extra, generator=g, dtype=torch.float64)
        t = (t / t.sum(1, keepdim=True)).to(dtype)
    return x.to(device).requires_grad_(), t.to(device)


def seed_of(*parts):
    """A deterministic seed from a test's parameters (never hash(): it is salted per process)."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def grads_of(fn, x, reduction, seed=0):
    loss = fn()
    g = torch.Generator().manual_seed(seed)
    go = torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss.device, loss.dtype) + 0.5
    (gx,) = torch.autograd.grad(loss, x, go)
    return loss.detach(), gx


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind,reduction,weighted,smoothing",
                         list(itertools.product(["label", "prob"], ["mean", "sum", "none"],
                                                [False, True], [0.0, 0.15])))
def test_matches_torch(device, kind, reduction, weighted, smoothing):
    x, t = tensors(seed_of(kind, reduction, weighted, smoothing), 37, 11, kind, device=device)
    w = (torch.rand(11, dtype=torch.float64) + 0.5).to(device) if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=smoothing)
    want, want_g = grads_of(lambda: F.cross_entropy(x, t, **kw), x, reduction)
    got, got_g = grads_of(lambda: gt.cross_entropy(x, t, **kw), x, reduction)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_g, want_g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["label", "prob"])
def test_spatial_and_unbatched(device, kind):
    """(N, C, d1, d2) inputs (classes on axis 1, as torch) and a single (C,) sample."""
    x, t = tensors(3, 4, 6, kind, device=device, extra=(3, 2))
    for reduction in ("mean", "none"):
        want, want_g = grads_of(lambda: F.cross_entropy(x, t, reduction=reduction), x, reduction)
        got, got_g = grads_of(lambda: gt.cross_entropy(x, t, reduction=reduction), x, reduction)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_g, want_g, rtol=1e-10, atol=1e-12)
    x1 = x.detach()[0, :, 0, 0].clone().requires_grad_()
    t1 = t[0, 0, 0] if kind == "label" else t[0, :, 0, 0]
    if kind == "label":
        t1 = torch.tensor(2, device=x.device)
    torch.testing.assert_close(gt.cross_entropy(x1, t1), F.cross_entropy(x1, t1))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float32_and_half(device, dtype):
    x, t = tensors(5, 64, 33, "label", dtype=dtype, device=device)
    got, got_g = grads_of(lambda: gt.cross_entropy(x, t), x, "mean")
    x64 = x.detach().double().requires_grad_()
    want, want_g = grads_of(lambda: F.cross_entropy(x64, t), x64, "mean")
    assert got.dtype == dtype and got_g.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got_g.double(), want_g, rtol=tol, atol=tol * 0.1)


def test_gradcheck_and_legacy_arguments():
    x, t = tensors(9, 5, 4, "label")
    t[0] = 1  # keep at least one row
    assert torch.autograd.gradcheck(lambda a: gt.cross_entropy(a, t, label_smoothing=0.1), (x,))
    assert torch.autograd.gradcheck(lambda a: gt.cross_entropy(a, t, reduction="none"), (x,))
    torch.testing.assert_close(gt.cross_entropy(x, t, size_average=False),
                               F.cross_entropy(x, t, reduction="sum"))
    torch.testing.assert_close(gt.cross_entropy(x, t, reduce=False),
                               F.cross_entropy(x, t, reduction="none"))


def test_z_loss_passes_through():
    import gpuce

    x, t = tensors(2, 8, 5, "label")
    got = gt.cross_entropy(x, t, z_loss=1e-2).detach()
    want = gpuce.softmax_cross_entropy(x.detach().numpy(), t.numpy(), z_loss=1e-2)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    assert float(got) > float(F.cross_entropy(x, t).detach())


def test_no_grad_and_inputs_untouched():
    x, t = tensors(4, 6, 5, "label")
    before = x.detach().clone()
    with torch.no_grad():
        loss = gt.cross_entropy(x, t)
    assert not loss.requires_grad
    gt.cross_entropy(x, t).backward()
    torch.testing.assert_close(x.detach(), before, rtol=0, atol=0)
    assert x.grad is not None


def test_bad_input():
    x, t = tensors(1, 4, 3, "label")
    with pytest.raises(TypeError, match="bfloat16"):
        gt.cross_entropy(x.detach().bfloat16(), t)
    with pytest.raises(TypeError, match="bfloat16"):
        gt.linear_cross_entropy(torch.randn(4, 2, dtype=torch.bfloat16),
                                torch.randn(3, 2, dtype=torch.bfloat16), t)
    with pytest.raises(ValueError, match="out of range"):
        gt.cross_entropy(x, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match="reduction"):
        gt.cross_entropy(x, t, reduction="avg")
    with pytest.raises(TypeError, match="tensor"):
        gt.cross_entropy(x.detach().numpy(), t)
    with pytest.raises(NotImplementedError, match="probability targets"):
        gt.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2),
                                torch.rand(4, 3, requires_grad=True))
    with pytest.raises(NotImplementedError, match="ce_weight"):
        gt.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), torch.rand(4, 3),
                                ce_weight=torch.rand(3, requires_grad=True))
    with pytest.raises(TypeError, match="chunk_size must be an integer"):
        gt.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), torch.tensor([0, 1, 2, 0]),
                                chunk_size=2.5)
    with pytest.raises(ValueError, match="target must have shape"):
        gt.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="chunk_size"):
        gt.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), torch.tensor([0, 1, 2, 0]),
                                chunk_size=0)


def linear_tensors(seed, n, d, c, kind, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = (torch.randn(c, d, generator=g, dtype=torch.float64) * 0.5).to(device, dtype).requires_grad_()
    b = torch.randn(c, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    _, t = tensors(seed, n, c, kind, dtype=dtype, device=device)
    return x, w, b, t


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind,reduction,chunk", list(itertools.product(
    ["label", "prob"], ["mean", "sum", "none"], [None, 7])))
def test_linear_matches_torch(device, kind, reduction, chunk):
    x, w, b, t = linear_tensors(seed_of(kind, reduction, chunk), 29, 6, 9, kind, device=device)
    cw = (torch.rand(9, dtype=torch.float64) + 0.5).to(device)
    kw = dict(reduction=reduction, label_smoothing=0.1)

    def run(fn):
        loss = fn()
        go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
        return (loss.detach(),) + torch.autograd.grad(loss, (x, w, b), go)

    want = run(lambda: F.cross_entropy(F.linear(x, w, b), t, weight=cw, **kw))
    got = run(lambda: gt.linear_cross_entropy(x, w, t, b, ce_weight=cw, chunk_size=chunk, **kw))
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-10, atol=1e-12)


def test_linear_only_weight_grad_and_batch_dims():
    x, w, b, t = linear_tensors(8, 12, 4, 5, "label")
    x3 = x.detach().reshape(3, 4, 4)
    t3 = t.reshape(3, 4)
    loss = gt.linear_cross_entropy(x3, w, t3, chunk_size=5)
    (gw,) = torch.autograd.grad(loss, (w,))
    w2 = w.detach().clone().requires_grad_()
    want = F.cross_entropy(F.linear(x3, w2).reshape(12, 5), t3.reshape(12))
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(gw, w2.grad, rtol=1e-10, atol=1e-12)
    per_row = gt.linear_cross_entropy(x3, w, t3, reduction="none")
    assert per_row.shape == (3, 4)


def test_loss_modules():
    x, t = tensors(12, 10, 7, "label")
    w = torch.rand(7, dtype=torch.float64) + 0.5
    mod = gt.CrossEntropyLoss(weight=w, label_smoothing=0.05)
    ref = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.05)
    assert set(mod.state_dict()) == set(ref.state_dict()) == {"weight"}
    got, got_g = grads_of(lambda: mod(x, t), x, "mean")
    want, want_g = grads_of(lambda: ref(x, t), x, "mean")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_g, want_g, rtol=1e-10, atol=1e-12)
    xl, wl, bl, tl = linear_tensors(13, 10, 4, 7, "label")
    lin = gt.LinearCrossEntropyLoss(ce_weight=w, reduction="sum", chunk_size=3)
    torch.testing.assert_close(lin(xl, wl, tl, bl),
                               F.cross_entropy(F.linear(xl, wl, bl), tl, weight=w, reduction="sum"))
