"""gpuce.torch on bfloat16 tensors: against torch's own F.cross_entropy on bfloat16, both
compared with float64 on the same values; zero-copy crossing (identical data pointers);
the custom operators' schema and fake implementations (opcheck, torch.compile); the
missing-ml_dtypes error."""

import itertools
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import gpuce.torch as gt  # noqa: E402
from helpers import BFLOAT16, TOL, seed_of, torch_devices, torch_inputs  # noqa: E402

BF = torch.bfloat16
# the gradient and the (bfloat16) loss are rounded once from float32: TOL[bfloat16]'s one ulp
RTOL, ATOL = TOL[BFLOAT16]


def devices():
    return torch_devices(torch)


def data(seed, n, c, kind, device="cpu", extra=()):
    return torch_inputs(torch, torch.Generator().manual_seed(seed), n, c, kind, scale=3, dtype=BF,
                        device=device, extra=extra)


def loss_and_grad(fn, x, *args, **kw):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args, **kw)
    # the incoming gradient holds bfloat16 values whatever the loss's dtype: the float64
    # reference is then differentiated with the very values gpuce sees
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape).to(BF).to(loss.device)
    (g,) = torch.autograd.grad(loss, x, go.to(loss.dtype))
    return loss.detach(), g


def error(got, want):
    """max |got - want| / max(1, max |want|), in float64."""
    got, want = got.double().cpu(), want.double().cpu()
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    return float((got - want).abs().max()) / scale if want.numel() else 0.0


def up64(v):
    return None if v is None else v.detach().double()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind,reduction,weighted,smoothing",
                         list(itertools.product(["label", "prob"], ["mean", "sum", "none"],
                                                [False, True], [0.0, 0.15])))
def test_cross_entropy_against_torch_and_float64(device, kind, reduction, weighted, smoothing):
    x, t = data(seed_of(kind, reduction, weighted, smoothing), 29, 13, kind, device)
    w = (torch.rand(13, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5)
    w = w.to(BF).to(device) if weighted else None
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    loss, grad = loss_and_grad(gt.cross_entropy, x, t, w, **kw)
    assert loss.dtype == BF and grad.dtype == BF  # the input's dtype, as torch
    t_ref = t if kind == "label" else t.double()
    ref_loss, ref_grad = loss_and_grad(F.cross_entropy, x.double(), t_ref, up64(w), **kw)
    torch_loss, torch_grad = loss_and_grad(F.cross_entropy, x, t, w, **kw)
    # gpuce: the float32 loss rounded once to bfloat16; the gradient rounded once, then
    # scaled by the incoming gradient in bfloat16 (one more rounding): two ulps at most
    torch.testing.assert_close(loss.double(), ref_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2 * RTOL,
                               atol=ATOL * max(1.0, float(ref_grad.abs().max())))
    # torch on bfloat16, measured against the same float64 result: gpuce is no less accurate
    # than torch (beyond one ulp)
    assert error(loss, ref_loss) <= error(torch_loss, ref_loss) + RTOL
    assert error(grad, ref_grad) <= error(torch_grad, ref_grad) + RTOL


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_against_torch_and_float64(device, reduction, bias):
    g = torch.Generator().manual_seed(seed_of("linear", reduction, bias))
    n, d, c = 33, 16, 11
    X = torch.randn(n, d, generator=g, dtype=torch.float64).to(BF).to(device)
    W = (0.5 * torch.randn(c, d, generator=g, dtype=torch.float64)).to(BF).to(device)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(BF).to(device) if bias else None
    y = torch.randint(0, c, (n,), generator=g).to(device)
    y[::5] = -100

    def run(fn, dtype):
        leaves = [v.detach().to(dtype).requires_grad_() for v in (X, W) + ((b,) if bias else ())]
        loss = fn(leaves[0], leaves[1], y, leaves[2] if bias else None)
        go = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape).to(loss.device)
        return (loss.detach(),) + torch.autograd.grad(loss, leaves, go.to(BF).to(loss.dtype))

    def gpuce_fn(x, w, t, bb):
        return gt.linear_cross_entropy(x, w, t, linear_bias=bb, reduction=reduction, chunk_size=8)

    def torch_fn(x, w, t, bb):
        return F.cross_entropy(F.linear(x, w, bb), t, reduction=reduction)

    got = run(gpuce_fn, BF)
    ref = run(torch_fn, torch.float64)
    tor = run(torch_fn, BF)
    assert all(v.dtype == BF for v in got)
    for i, (a, r, tt) in enumerate(zip(got, ref, tor)):
        # both round the logits to bfloat16 (F.linear in bfloat16): the error bound of
        # test_bfloat16.test_linear_against_reference, (2 + 2 max|f|) half-ulps
        fmax = float((X.double() @ W.double().T).abs().max()) + (
            float(b.double().abs().max()) if bias else 0.0)
        bound = (2 + 2 * fmax) * 2.0**-9
        assert error(a, r) <= bound, (i, error(a, r), bound)
        assert error(a, r) <= error(tt, r) + 2 * RTOL, (i, error(a, r), error(tt, r))


def test_crossing_is_zero_copy():
    """A bfloat16 tensor becomes a NumPy ml_dtypes.bfloat16 array on the same memory (the
    int16 view), and a bfloat16 result goes back to torch on the same memory."""
    x = torch.randn(6, 10, dtype=torch.float32).to(BF)
    a = gt._to_array(x)
    assert a.dtype == BFLOAT16 and a.shape == (6, 10)
    assert a.ctypes.data == x.data_ptr()
    np.testing.assert_array_equal(a.astype(np.float32), x.float().numpy())
    view = x.t()  # strided: still the same memory, strides kept
    av = gt._to_array(view)
    assert av.ctypes.data == view.data_ptr() and av.strides == (2, 20)
    back = gt._to_tensor(a)
    assert back.dtype == BF and back.data_ptr() == a.ctypes.data == x.data_ptr()
    g = np.arange(12, dtype=np.float32).reshape(3, 4).astype(BFLOAT16)
    t = gt._to_tensor(g)
    assert t.data_ptr() == g.ctypes.data
    torch.testing.assert_close(t.float(), torch.arange(12.0).reshape(3, 4))


@pytest.mark.gpu
def test_cuda_crossing_is_zero_copy():
    x = torch.randn(6, 10, device="cuda").to(BF)
    a = gt._to_array(x)
    assert a.dtype == BFLOAT16 and a.data.ptr == x.data_ptr()
    back = gt._to_tensor(a)
    assert back.dtype == BF and back.data_ptr() == x.data_ptr()
    cpu_x = x.cpu()
    t = torch.randint(0, 10, (6,))
    l_gpu, g_gpu = loss_and_grad(gt.cross_entropy, x, t.cuda())
    l_cpu, g_cpu = loss_and_grad(gt.cross_entropy, cpu_x, t)
    torch.testing.assert_close(l_gpu.cpu(), l_cpu, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=RTOL, atol=ATOL)


def test_missing_ml_dtypes_names_the_package(monkeypatch):
    x, t = data(3, 4, 5, "label")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes raises ImportError
    with pytest.raises(TypeError, match="pip install ml_dtypes"):
        gt.cross_entropy(x, t)
    with pytest.raises(TypeError, match="ml_dtypes"):
        gt.linear_cross_entropy(torch.randn(4, 3).to(BF), torch.randn(5, 3).to(BF), t)
    with pytest.raises(TypeError, match="ml_dtypes"):
        gt._to_array(x)
    # float32 still works without it
    assert gt.cross_entropy(x.float(), t).dtype == torch.float32


def test_opcheck_bfloat16():
    from torch.library import opcheck

    ops = torch.ops.gpuce
    x, t = data(31, 5, 4, "label")
    _, p = data(32, 5, 4, "prob")
    w = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=BF)
    x.requires_grad_()
    for args in [(x, t, w, "mean", -100, 0.1, 0.0, True),
                 (x, p, None, "none", -100, 0.1, 0.01, True),
                 (x, p, None, "sum", -100, 0.0, 0.0, False)]:
        opcheck(ops.cross_entropy.default, args)
    opcheck(ops.cross_entropy_backward.default,
            (torch.tensor(0.7, dtype=BF), x.detach(), p, w, "mean", -100, 0.1, 0.0, True, True,
             True))
    g = torch.Generator().manual_seed(33)
    xl = torch.randn(6, 3, generator=g).to(BF).requires_grad_()
    wl = torch.randn(4, 3, generator=g).to(BF).requires_grad_()
    bl = torch.randn(4, generator=g).to(BF).requires_grad_()
    tl = torch.randint(0, 4, (6,), generator=g)
    for args in [(xl, wl, tl, bl, None, "mean", -100, 0.1, 0.0, None, True, True),
                 (xl, wl, tl, None, None, "none", -100, 0.0, 0.0, 4, True, False)]:
        opcheck(ops.linear_cross_entropy.default, args)
    opcheck(ops.linear_cross_entropy_backward.default,
            (torch.linspace(0.5, 1.5, 6).to(BF), xl.detach(), wl.detach(), tl, bl.detach(), None,
             "none", -100, 0.0, 0.0, 4, True))


def test_compiled_fullgraph_bfloat16():
    """torch.compile(fullgraph=True): the fake implementations give bfloat16 outputs for
    bfloat16 inputs, so the compiled graph's loss and gradient match eager exactly."""
    torch._dynamo.reset()
    x, t = data(41, 8, 6, "label")

    def fn(v, target):
        return gt.cross_entropy(v, target, label_smoothing=0.1) * 2

    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    want = loss_and_grad(fn, x, t)
    got = loss_and_grad(compiled, x, t)
    for a, b in zip(got, want):
        assert a.dtype == BF
        torch.testing.assert_close(a, b, rtol=0, atol=0)
