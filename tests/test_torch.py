"""gpuce.torch against torch's own cross_entropy (CPU tensors here; CUDA tensors on a GPU)."""

import itertools

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import gpuce.torch as gt  # noqa: E402
from helpers import seed_of, torch_devices, torch_inputs  # noqa: E402


def devices():
    return torch_devices(torch)


def tensors(seed, n, c, kind, dtype=torch.float64, device="cpu", extra=()):
    x, t = torch_inputs(torch, torch.Generator().manual_seed(seed), n, c, kind, scale=3,
                        dtype=dtype, device=device, extra=extra)
    return x.requires_grad_(), t


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
    with pytest.raises(TypeError, match="float8_e4m3fn"):  # bfloat16: test_torch_bfloat16.py
        gt.cross_entropy(x.detach().to(torch.float8_e4m3fn), t)
    with pytest.raises(TypeError, match="float8_e5m2"):
        gt.linear_cross_entropy(torch.randn(4, 2).to(torch.float8_e5m2),
                                torch.randn(3, 2).to(torch.float8_e5m2), t)
    with pytest.raises(ValueError, match="out of range"):
        gt.cross_entropy(x, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match="reduction"):
        gt.cross_entropy(x, t, reduction="avg")
    with pytest.raises(TypeError, match="tensor"):
        gt.cross_entropy(x.detach().numpy(), t)
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
    got = run(lambda: gt.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, chunk_size=chunk, **kw))
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
    lin = gt.LinearCrossEntropyLoss(wl.shape[1], wl.shape[0], bias=True, weight=w,
                                    reduction="sum", chunk_size=3, dtype=torch.float64)
    ref = torch.nn.LinearCrossEntropyLoss(wl.shape[1], wl.shape[0], bias=True, weight=w,
                                          reduction="sum", dtype=torch.float64)
    with torch.no_grad():
        for m in (lin, ref):
            m.linear.weight.copy_(wl)
            m.linear.bias.copy_(bl)
    torch.testing.assert_close(lin(xl, tl), ref(xl, tl))
    torch.testing.assert_close(lin(xl, tl),
                               F.cross_entropy(F.linear(xl, wl, bl), tl, weight=w, reduction="sum"))
    assert sorted(dict(lin.named_parameters())) == sorted(dict(ref.named_parameters()))


# --- gradients with respect to probability targets and class weights -----------------------

def run_all_grads(fn, leaves):
    """Loss and the gradients of Σ g·loss for every leaf (g fixed, so that two runs agree)."""
    loss = fn()
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    return (loss.detach(),) + torch.autograd.grad(loss, leaves, go)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction,smoothing,extra", list(itertools.product(
    ["mean", "sum", "none"], [0.0, 0.2], [(), (3, 2)])))
def test_target_and_weight_grads_match_torch(device, reduction, smoothing, extra):
    """∂/∂p = −(1−ε) w log q and ∂/∂w = −Σ p′ log q, reduced as the loss: against torch,
    whose soft-target path differentiates both."""
    x, p = tensors(seed_of("tgrad", reduction, smoothing, extra), 9, 5, "prob", device=device,
                   extra=extra)
    p = (p * 1.3).requires_grad_()  # unnormalised rows too: the formula does not need Σ p = 1
    g = torch.Generator().manual_seed(seed_of("w", reduction))
    w = (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    want = run_all_grads(lambda: F.cross_entropy(x, p, weight=w, **kw), (x, p, w))
    got = run_all_grads(lambda: gt.cross_entropy(x, p, weight=w, **kw), (x, p, w))
    for name, a, b in zip(("loss", "input", "target", "weight"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    # only the target requires grad: no input gradient is computed, the target's still is
    x0 = x.detach()
    (gp,) = torch.autograd.grad(gt.cross_entropy(x0, p, **kw).sum(), (p,))
    (wp,) = torch.autograd.grad(F.cross_entropy(x0, p, **kw).sum(), (p,))
    torch.testing.assert_close(gp, wp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction,chunk", [("mean", None), ("sum", 4), ("none", 3)])
def test_linear_target_and_ce_weight_grads_match_torch(device, reduction, chunk):
    """linear_cross_entropy differentiates a probability target and ce_weight too (logits
    formed again in backward, chunk by chunk)."""
    x, w, b, p = linear_tensors(seed_of("ltgrad", reduction, chunk), 11, 4, 6, "prob", device=device)
    x3, p3 = x.detach().reshape(1, 11, 4).requires_grad_(), p.reshape(1, 11, 6).requires_grad_()
    cw = (torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) + 0.5)
    cw = cw.to(device).requires_grad_()
    kw = dict(reduction=reduction, label_smoothing=0.1)
    leaves = (x3, w, b, p3, cw)
    got = run_all_grads(lambda: gt.linear_cross_entropy(x3, w, p3, linear_bias=b, weight=cw, chunk_size=chunk,
                                                        **kw), leaves)
    want = run_all_grads(lambda: F.cross_entropy(F.linear(x3, w, b).reshape(11, 6), p3.reshape(11, 6),
                                                 weight=cw, **kw).reshape(got[0].shape), leaves)
    for name, a, b_ in zip(("loss", "input", "weight", "bias", "target", "ce_weight"), got, want):
        assert a.shape == b_.shape and a.dtype == b_.dtype, name
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12, msg=name)


def test_backward_keeps_no_logits():
    """Only the fused gradient is kept for backward (not the N x C logits) when nothing but
    the logits need a gradient; the linear version keeps neither X nor W for mean/sum."""
    import gc
    import weakref

    leaf, t = tensors(26, 8, 5, "label")
    logits = leaf * 2.0  # a non-leaf, as a model's output
    ref = weakref.ref(logits)
    loss = gt.cross_entropy(logits, t, label_smoothing=0.1)
    del logits
    gc.collect()
    assert ref() is None, "the logits are held for backward"
    loss.backward()
    (want,) = torch.autograd.grad(F.cross_entropy(leaf * 2.0, t, label_smoothing=0.1), leaf)
    torch.testing.assert_close(leaf.grad, want, rtol=1e-10, atol=1e-12)
    x, w, b, tl = linear_tensors(27, 8, 3, 5, "label")
    h = x * 2.0  # a non-leaf that its own backward does not keep
    ref = weakref.ref(h)
    loss = gt.linear_cross_entropy(h, w, tl, linear_bias=b, reduction="sum")
    del h
    gc.collect()
    assert ref() is None, "linear_cross_entropy's input is held for backward"
    loss.backward()
    assert x.grad is not None and w.grad is not None


def test_target_gradcheck():
    """Finite differences (float64) for input, probability target and weight at once."""
    x, p = tensors(21, 4, 3, "prob")
    p = p.requires_grad_()
    w = (torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5)
    w.requires_grad_()
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b, c: gt.cross_entropy(a, b, weight=c, reduction=reduction,
                                             label_smoothing=0.1, z_loss=0.01), (x, p, w))


def test_weight_requires_grad_with_labels_raises_as_torch():
    x, t = tensors(22, 6, 4, "label")
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="weight"):
        F.cross_entropy(x, t, weight=w)  # torch's behaviour, which gpuce follows
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        gt.cross_entropy(x, t, weight=w)
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        gt.linear_cross_entropy(torch.randn(6, 2, dtype=torch.float64),
                                torch.randn(4, 2, dtype=torch.float64), t, weight=w)
    with torch.no_grad():  # no autograd, no error (as torch)
        torch.testing.assert_close(gt.cross_entropy(x, t, weight=w), F.cross_entropy(x, t, weight=w))


def test_double_backward_raises():
    x, t = tensors(23, 6, 4, "label")
    (gx,) = torch.autograd.grad(gt.cross_entropy(x, t), x, create_graph=True)
    (want,) = torch.autograd.grad(F.cross_entropy(x, t), x)
    torch.testing.assert_close(gx.detach(), want, rtol=1e-12, atol=1e-14)  # first order still right
    with pytest.raises(RuntimeError, match="double backward.*cross_entropy.*not supported"):
        gx.pow(2).sum().backward()
    _, p = tensors(23, 6, 4, "prob")
    p.requires_grad_()
    (gp,) = torch.autograd.grad(gt.cross_entropy(x, p), p, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (gp * 2).sum().backward()
    xl, wl, bl, tl = linear_tensors(24, 6, 3, 4, "label")
    for reduction in ("mean", "none"):
        loss = gt.linear_cross_entropy(xl, wl, tl, linear_bias=bl, reduction=reduction).sum()
        (gw,) = torch.autograd.grad(loss, wl, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward.*linear_cross_entropy"):
            gw.sum().backward()
    _, _, _, pl = linear_tensors(25, 6, 3, 4, "prob")
    pl.requires_grad_()
    (gp,) = torch.autograd.grad(gt.linear_cross_entropy(xl, wl, pl, linear_bias=bl), pl, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*linear_cross_entropy"):
        gp.sum().backward()


# --- torch's own OpInfo samples for nn.functional.cross_entropy ------------------------------

def opinfo_cases(dtype, seed):
    """The cases of torch's ``sample_inputs_cross_entropy`` (torch.testing), built here so
    that they run without torch's test dependencies: N=2, C=3; inputs (2,3), (2,3,1),
    (2,3,1,2), (2,3,1,2,3); each reduction; a class weight with each reduction; ignore_index=1
    (labels only); each with class-index and with probability targets (these require grad).
    Values are uniform as torch's make_tensor draws them (inputs in [-9, 9), probabilities in
    [0, 1)); class weights in [-9, 9), negative ones included, as torch draws them."""
    g = torch.Generator().manual_seed(seed)

    def uniform(shape, lo, hi, rg=False):
        u = torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo
        return u.to(dtype).requires_grad_(rg)

    shape = (2, 3)
    configs = [(shape, {}), (shape + (1,), {}), (shape + (1, 2), {}), (shape + (1, 2, 3), {})]
    configs += [(shape, dict(reduction=r)) for r in ("mean", "sum", "none")]
    configs += [(shape, dict(weight="w", reduction=r)) for r in ("mean", "sum", "none")]
    configs += [(shape, dict(ignore_index=1))]
    out = []
    for in_shape, kw in configs:
        for prob in (False, True):
            if prob and "ignore_index" in kw:
                continue
            kw = dict(kw)
            if kw.get("weight") == "w":
                kw["weight"] = uniform((3,), -9.0, 9.0)
            x = uniform(in_shape, -9.0, 9.0, rg=True)
            if prob:
                t = uniform(in_shape, 0.0, 1.0, rg=True)
            else:
                t = torch.randint(0, 3, (2,) + in_shape[2:], generator=g)
                if "ignore_index" in kw and bool((t == 1).all()):
                    t.view(-1)[0] = 0
            out.append((x, t, kw))
    return out


def check_against_torch(x, t, kw):
    """gpuce and F.cross_entropy on one sample: loss and every gradient torch computes."""
    leaves = tuple(v for v in (x, t) if v.requires_grad)
    want = run_all_grads(lambda: F.cross_entropy(x, t, **kw), leaves)
    got = run_all_grads(lambda: gt.cross_entropy(x, t, **kw), leaves)
    tol = dict(rtol=1e-10, atol=1e-12) if x.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)
    return len(leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opinfo_cases(dtype):
    cases = opinfo_cases(dtype, seed_of("opinfo", str(dtype)))
    assert len(cases) == 21
    n_target_grads = sum(check_against_torch(x, t, kw) == 2 for x, t, kw in cases)
    assert n_target_grads == 10  # the soft-target samples differentiate the target too


def test_opinfo_samples_from_torch():
    """The same on torch's own sample inputs, where torch's test helpers import (they need
    the expecttest package), their negative class weights included."""
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [o for o in op_db if o.name == "nn.functional.cross_entropy"]
    torch.manual_seed(seed_of("op_db"))
    n = 0
    for dtype in (torch.float32, torch.float64):
        mine = opinfo_cases(dtype, 0)
        samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
        assert [(s.input.shape, s.args[0].shape, sorted(s.kwargs)) for s in samples] == \
               [(x.shape, t.shape, sorted(kw)) for x, t, kw in mine]
        for s in samples:
            check_against_torch(s.input, s.args[0], dict(s.kwargs))
            n += 1
    assert n == 42


# --- the operators' registration ----------------------------------------------------------------

def test_opcheck():
    """torch.library.opcheck: schema, fake implementation, autograd registration and
    AOT-dispatch agreement of the five gpuce operators on a few inputs."""
    from torch.library import opcheck

    ops = torch.ops.gpuce
    x, t = tensors(31, 5, 4, "label")
    _, p = tensors(32, 5, 4, "prob")
    p.requires_grad_()
    w = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    xs, ts = tensors(33, 3, 4, "label", dtype=torch.float32, extra=(2,))
    xs = xs.detach().movedim(1, -1).requires_grad_()  # a non-contiguous (N, d1, C) view
    ts[ts == -100] = 1  # ignore_index=1: a class index ignored
    for args in [(x, t, w, "mean", -100, 0.1, 0.0, True), (x, p, w, "none", -100, 0.1, 0.01, True),
                 (x, p, None, "sum", -100, 0.0, 0.0, False), (xs, ts, None, "none", 1, 0.0, 0.0, True)]:
        opcheck(ops.cross_entropy.default, args)
    opcheck(ops.cross_entropy_backward.default,
            (torch.tensor(0.7, dtype=torch.float64), x.detach(), p.detach(), w, "mean", -100,
             0.1, 0.0, True, True, True))
    xl, wl, bl, tl = linear_tensors(34, 6, 3, 4, "label")
    _, _, _, pl = linear_tensors(35, 6, 3, 4, "prob")
    for args in [(xl, wl, tl, bl, w, "mean", -100, 0.1, 0.0, None, True, True),
                 (xl, wl, pl, None, None, "sum", -100, 0.0, 0.01, 4, False, True),
                 (xl, wl, tl, bl, None, "none", -100, 0.0, 0.0, 4, True, False)]:
        opcheck(ops.linear_cross_entropy.default, args)
    opcheck(ops.linear_cross_entropy_backward.default,
            (torch.linspace(0.5, 1.5, 6, dtype=torch.float64), xl.detach(), wl.detach(), tl,
             bl.detach(), None, "none", -100, 0.0, 0.0, None, True))
    opcheck(ops.linear_cross_entropy_backward.default,
            (torch.tensor(0.9, dtype=torch.float64), xl.detach(), wl.detach(), pl, None, w,
             "mean", -100, 0.1, 0.01, 4, False))
    opcheck(ops.linear_cross_entropy_target_backward.default,
            (torch.tensor(1.3, dtype=torch.float64), xl.detach(), wl.detach(), pl, bl.detach(), w,
             "mean", 0.1, 4, True, True))


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_cuda_tensors_on_a_side_stream_run_on_that_stream(op):
    """CUDA tensors on a non-default torch stream: gpuce's kernels run on that stream. The
    stream is kept busy (torch.cuda._sleep) before it writes the inputs, so work put on any
    other stream would read them unwritten (zeros); the results are the default stream's (to
    rounding: cuBLAS may pick another algorithm on another stream)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    g = torch.Generator().manual_seed(seed_of("side stream", op))
    n, d, c = 2048, 64, 1000
    src = torch.randn(n, d if op == "linear_cross_entropy" else c, generator=g).cuda()
    w_src = (torch.randn(c, d, generator=g) / 8).cuda()
    y = torch.randint(0, c, (n,), generator=g).cuda()

    def call(a, w):
        if op == "cross_entropy":
            loss = gt.cross_entropy(a, y)
            return (loss,) + torch.autograd.grad(loss, a)
        loss = gt.linear_cross_entropy(a, w, y)
        return (loss,) + torch.autograd.grad(loss, (a, w))

    want = call(src.clone().requires_grad_(), w_src.clone().requires_grad_())
    torch.cuda.synchronize()
    a, w = torch.zeros_like(src), torch.zeros_like(w_src)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # the side stream is busy for tens of milliseconds ...
        a.copy_(src)  # ... before the inputs hold their values
        w.copy_(w_src)
        got = call(a.requires_grad_(), w.requires_grad_())
    side.synchronize()
    for x, ref in zip(got, want):
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-6)
    assert float(got[-1].abs().max()) > 1e-4  # the gradients are not the zeros a stray read gives
