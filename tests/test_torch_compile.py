"""gpuce.torch inside torch.compile (inductor, fullgraph=True): the gpuce operators stay
opaque calls, so values and gradients equal eager gpuce's and torch's own cross_entropy.

Each case compiles a fresh function (seconds each on a small CPU): the cases are few and
small, each covering several options at once.
"""


import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import gpuce.torch as gt  # noqa: E402
from helpers import seed_of, torch_devices  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402


def devices():
    return torch_devices(torch)


def compiled(fn, fullgraph=True):
    """fn compiled with inductor (with fullgraph=True a graph break raises), and a counter
    of the frames it compiled."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    return torch.compile(fn, backend=counter, fullgraph=fullgraph), counter


def loss_and_grads(fn, args, leaves):
    loss = fn(*args)
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    return (loss.detach(),) + torch.autograd.grad(loss, leaves, go)


def assert_all_close(got, want, dtype, what):
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"{what}, output {i}: {m}")


def test_reported_compile_reproducers():
    """The reported cases, compiled as they were reported (inductor, graph breaks allowed):
    default options on float64 (5, 7) logits, where dynamo traced gpuce's NumPy code and
    the gradient came out 0.2 off, and linear_cross_entropy's mean, about 1 off."""
    g = torch.Generator().manual_seed(seed_of("issue12"))
    x = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (5,), generator=g)
    fn, counter = compiled(lambda a, b: gt.cross_entropy(a, b), fullgraph=False)
    got = loss_and_grads(fn, (x, t), (x,))
    assert_all_close(got, loss_and_grads(F.cross_entropy, (x, t), (x,)), torch.float64, "ce")
    assert counter.frame_count == 1  # one graph: no break either
    w = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fn, counter = compiled(lambda a, ww, b: gt.linear_cross_entropy(a, ww, b), fullgraph=False)
    got = loss_and_grads(fn, (h, w, t), (h, w))
    want = loss_and_grads(lambda a, ww, b: F.cross_entropy(F.linear(a, ww), b), (h, w, t), (h, w))
    assert_all_close(got, want, torch.float64, "linear")
    assert counter.frame_count == 1


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind,dtype,reduction", [
    ("label", torch.float64, "mean"), ("label", torch.float32, "sum"),
    ("label", torch.float64, "none"), ("prob", torch.float64, "mean"),
    ("prob", torch.float32, "none"), ("prob", torch.float64, "sum")],
    ids=lambda v: str(v).replace("torch.", ""))
def test_compiled_cross_entropy(device, kind, dtype, reduction):
    """Weights, label smoothing and (labels) ignore_index, spatial (N, C, d) logits; for
    probabilities the target requires grad as well."""
    g = torch.Generator().manual_seed(seed_of(kind, str(dtype), reduction))
    x = (torch.randn(6, 5, 3, generator=g, dtype=torch.float64) * 3).to(device, dtype).requires_grad_()
    w = (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).to(device, dtype)
    if kind == "label":
        t = torch.randint(0, 5, (6, 3), generator=g)
        t[0, 0] = t[2, 1] = 4  # ignored below
        t = t.to(device)
        kw = dict(weight=w, ignore_index=4, reduction=reduction, label_smoothing=0.1)
        leaves = (x,)
    else:
        t = torch.rand(6, 5, 3, generator=g, dtype=torch.float64)
        t = (t / t.sum(1, keepdim=True)).to(device, dtype).requires_grad_()
        kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
        leaves = (x, t)
    fn, counter = compiled(lambda a, b: gt.cross_entropy(a, b, **kw))
    got = loss_and_grads(fn, (x, t), leaves)
    assert counter.frame_count == 1
    eager = loss_and_grads(lambda a, b: gt.cross_entropy(a, b, **kw), (x, t), leaves)
    assert_all_close(got, eager, dtype, "compiled vs eager gpuce")
    x64 = x.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_(t.requires_grad) if kind == "prob" else t
    kw64 = dict(kw, weight=w.double())
    want = loss_and_grads(lambda a, b: F.cross_entropy(a, b, **kw64), (x64, t64),
                          (x64, t64) if kind == "prob" else (x64,))
    assert_all_close(got, [v.to(dtype) for v in want], dtype, "compiled vs F.cross_entropy")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind,reduction", [("label", "mean"), ("label", "sum"), ("label", "none"),
                                            ("prob", "none")])
def test_compiled_linear_cross_entropy(device, kind, reduction):
    """linear_cross_entropy with bias, ce_weight, smoothing and ignored rows, (B, T, D) input,
    inside a compiled function with other torch ops around it; probability targets and
    ce_weight require grad too."""
    g = torch.Generator().manual_seed(seed_of("linear", kind, reduction))
    x = torch.randn(2, 5, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = (torch.randn(7, 4, generator=g, dtype=torch.float64) * 0.5).to(device).requires_grad_()
    b = torch.randn(7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    cw = (torch.rand(7, generator=g, dtype=torch.float64) + 0.5).to(device)
    if kind == "label":
        t = torch.randint(0, 7, (2, 5), generator=g)
        t[1, 2] = -100
        t = t.to(device)
        leaves = (x, w, b)
    else:
        t = torch.rand(2, 5, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
        cw.requires_grad_()
        leaves = (x, w, b, t, cw)
    kw = dict(reduction=reduction, label_smoothing=0.05, chunk_size=3)

    def f(a, ww, bb, tt, cc):
        return gt.linear_cross_entropy(torch.tanh(a) * 2, ww, tt, linear_bias=bb, weight=cc, **kw)

    fn, counter = compiled(f)
    got = loss_and_grads(fn, (x, w, b, t, cw), leaves)
    assert counter.frame_count == 1
    assert_all_close(got, loss_and_grads(f, (x, w, b, t, cw), leaves), torch.float64, "vs eager")

    def ref(a, ww, bb, tt, cc):
        tt = tt.reshape(10, 7) if kind == "prob" else tt.reshape(-1)
        return F.cross_entropy(F.linear(torch.tanh(a) * 2, ww, bb).reshape(-1, 7), tt,
                               weight=cc, reduction=reduction, label_smoothing=0.05)

    want = loss_and_grads(ref, (x, w, b, t, cw), leaves)
    if reduction == "none":
        want = (want[0].reshape(2, 5),) + want[1:]
    assert_all_close(got, want, torch.float64, "vs F.cross_entropy")


def test_graph_holds_the_gpuce_operators():
    """The traced graphs call gpuce::cross_entropy forward and gpuce::cross_entropy_backward
    in backward: nothing of gpuce's NumPy code is traced."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_function

    seen = {"fw": set(), "bw": set()}

    def keep(kind):
        def compiler(gm, _inputs):
            seen[kind] |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return make_boxed_func(gm)
        return compiler

    g = torch.Generator().manual_seed(seed_of("graph"))
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.rand(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = aot_function(lambda a, b: gt.cross_entropy(a, b), keep("fw"), keep("bw"))
    fn(x, p).backward()
    assert "gpuce.cross_entropy.default" in seen["fw"]
    assert "gpuce.cross_entropy_backward.default" in seen["bw"]
    assert not any("numpy" in s for s in seen["fw"] | seen["bw"])
