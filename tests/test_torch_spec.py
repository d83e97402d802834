"""gpuce.torch's operator spec (gpuce/torch/_spec.py): the eager twin and the custom operator
give the same bits, gradients, errors and autograd behaviour; eager calls skip the dispatcher
and traced ones go through it; each entry's fake matches its real outputs; a new operator is
one spec entry."""

import itertools

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import gpuce.torch as gt  # noqa: E402
from gpuce.torch import _spec  # noqa: E402
from helpers import seed_of  # noqa: E402


def gen(*parts):
    return torch.Generator().manual_seed(seed_of("spec", *parts))


def ce_case(g, dtype, kind, n=6, c=5):
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    if kind == "label":
        t = torch.randint(0, c, (n,), generator=g)
        t[1] = -100
    else:
        t = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), 1).to(dtype)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, t, w


def run(fn, leaves, create_graph=False):
    """fn()'s loss (and stats), the gradients of Σ g·loss + Σ lse² for every leaf, and (with
    create_graph) the error a second differentiation raises."""
    res = fn()
    loss, st = res if isinstance(res, tuple) else (res, None)
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).to(loss.dtype)
    total = (loss * g.reshape(loss.shape)).sum()
    if st is not None:
        total = total + (st.lse.double() ** 2).sum().to(total.dtype)
    out = [loss.detach(), loss.requires_grad, type(loss.grad_fn).__name__ if loss.grad_fn else None]
    if st is not None:
        out += [v for v in st]
    grads = torch.autograd.grad(total, leaves, create_graph=create_graph, allow_unused=True)
    out += [None if v is None else v.detach() for v in grads]
    if create_graph:
        with pytest.raises(RuntimeError) as e:
            sum(v.sum() for v in grads if v is not None).backward()
        out.append(str(e.value))
    return out


def assert_same_bits(a, b, what):
    assert len(a) == len(b), what
    for i, (u, v) in enumerate(zip(a, b)):
        if isinstance(u, torch.Tensor):
            assert isinstance(v, torch.Tensor) and u.dtype == v.dtype and u.shape == v.shape, (what, i)
            assert torch.equal(u.isnan(), v.isnan()), (what, i)
            assert torch.equal(u.nan_to_num(0.0), v.nan_to_num(0.0)), (what, i)
        else:
            assert u == v, (what, i, u, v)


def both_paths(fn, leaves, create_graph=False):
    """run() eagerly and through the custom operators, the grad_fn names aside."""
    eager = run(fn, leaves, create_graph)
    with _spec.through_custom_ops():
        custom = run(fn, leaves, create_graph)
    # the loss's grad_fn: the eager twin's or the custom operator's (else torch's own, a view
    # or an arithmetic node after the operator, the same on both paths)
    twins = {"CrossEntropyEagerBackward": "GeneratedBackwardFor_gpuce_cross_entropy_defaultBackward",
             "LinearCrossEntropyEagerBackward":
                 "GeneratedBackwardFor_gpuce_linear_cross_entropy_defaultBackward"}
    assert twins.get(eager[2], eager[2]) == custom[2]
    return eager[:2] + eager[3:], custom[:2] + custom[3:]


# --- the eager twin and the custom operator agree -----------------------------------------------

@pytest.mark.parametrize("dtype,kind", list(itertools.product(
    [torch.float64, torch.float32, torch.bfloat16], ["label", "prob"])),
    ids=lambda v: str(v).replace("torch.", ""))
def test_cross_entropy_paths_same_bits(dtype, kind):
    """Every reduction and option set, every requires-grad combination of logits, probability
    target and class weight: loss, statistics and gradients are the same bits on both paths,
    and so is the double-backward error."""
    g = gen("ce", str(dtype), kind)
    for reduction, opts in itertools.product(
            ["mean", "sum", "none"],
            [dict(), dict(label_smoothing=0.1, z_loss=1e-3), dict(softcap=2.5, return_stats=True)]):
        x, t, w = ce_case(g, dtype, kind)
        for need_x, need_t, need_w in itertools.product([True, False], repeat=3):
            if kind == "label" and (need_t or need_w):
                continue
            xi = x.detach().requires_grad_(need_x)
            ti = t.detach().requires_grad_(need_t) if kind == "prob" else t
            wi = w.detach().requires_grad_(need_w)
            leaves = [v for v, need in ((xi, need_x), (ti, need_t), (wi, need_w)) if need]
            if not leaves:
                continue

            def fn():
                return gt.cross_entropy(xi, ti, weight=wi, reduction=reduction, **opts)
            what = (reduction, str(opts), need_x, need_t, need_w)
            assert_same_bits(*both_paths(fn, leaves), what)

        def fn():
            return gt.cross_entropy(x, t, weight=w, reduction=reduction, **opts)
        assert_same_bits(*both_paths(fn, [x], create_graph=True), (reduction, str(opts), "cg"))


@pytest.mark.parametrize("kind,reduction", list(itertools.product(
    ["label", "prob"], ["mean", "sum", "none"])))
def test_linear_cross_entropy_paths_same_bits(kind, reduction):
    g = gen("lce", kind, reduction)
    h = torch.randn(7, 4, generator=g, dtype=torch.float64)
    W = torch.randn(5, 4, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(5, generator=g, dtype=torch.float64)
    _, t, cw = ce_case(g, torch.float64, kind, n=7)
    for opts in (dict(chunk_size=3, label_smoothing=0.1), dict(softcap=2.0, return_stats=True)):
        leaves = [v.detach().clone().requires_grad_() for v in (h, W, b)]
        tt, cc = t, cw
        if kind == "prob":
            tt, cc = t.detach().clone().requires_grad_(), cw.detach().clone().requires_grad_()
            leaves += [tt, cc]

        def fn():
            return gt.linear_cross_entropy(leaves[0], leaves[1], tt, linear_bias=leaves[2],
                                           weight=cc, reduction=reduction, **opts)
        assert_same_bits(*both_paths(fn, leaves), (kind, reduction, str(opts)))
    assert_same_bits(*both_paths(fn, leaves[:2], create_graph=True), (kind, reduction, "cg"))


def test_eager_values_match_a_float64_reference():
    """The eager path's loss and gradients against torch's float64 cross_entropy."""
    x, t, w = ce_case(gen("ref"), torch.float64, "prob", n=9, c=7)
    t = t.detach().requires_grad_()
    kw = dict(weight=w, label_smoothing=0.2)
    got = run(lambda: gt.cross_entropy(x, t, **kw), [x, t])
    want = run(lambda: F.cross_entropy(x, t, **kw), [x, t])
    assert got[2] == "CrossEntropyEagerBackward"
    for i in (0, 3, 4):
        torch.testing.assert_close(got[i], want[i], rtol=1e-12, atol=1e-14)


def test_no_grad_and_inference_mode_run_the_implementation():
    x, t, _ = ce_case(gen("nograd"), torch.float32, "label")
    with torch.no_grad():
        a = gt.cross_entropy(x, t)
    with torch.inference_mode():
        b = gt.cross_entropy(x, t)
    with _spec.through_custom_ops(), torch.no_grad():
        c = gt.cross_entropy(x, t)
    assert not a.requires_grad and not b.requires_grad and a.grad_fn is None
    assert torch.equal(a, c) and torch.equal(b, c)


def test_errors_are_the_same_on_both_paths():
    """Errors raised by the implementation, and those of the dispatcher's argument checks
    (an ignore_index beyond int64: such a call is routed to the custom operator)."""
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.tensor([0, 1, 2, 0])
    cases = [
        lambda: gt.cross_entropy(x, torch.tensor([0, 1, 7, 2])),
        lambda: gt.cross_entropy(x, t, label_smoothing=2.0),
        lambda: gt.cross_entropy(x, t, ignore_index=2 ** 70),
        lambda: gt.cross_entropy(x, t, weight=torch.tensor([1.0, float("nan"), 1.0])),
        lambda: gt.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), t,
                                        chunk_size=2 ** 70),
        lambda: gt.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2),
                                        torch.tensor([0, 5, 1, 1])),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(Exception) as eager:
            case()
        with _spec.through_custom_ops(), pytest.raises(Exception) as custom:
            case()
        assert type(eager.value) is type(custom.value), i
        assert str(eager.value) == str(custom.value), i


def test_autocast_same_on_both_paths():
    x, t, _ = ce_case(gen("autocast"), torch.float32, "label", n=8)
    lin = torch.nn.Linear(4, 5)
    h = torch.randn(8, 4, generator=gen("autocast h")).to(torch.bfloat16)

    def fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = gt.cross_entropy(x, t, label_smoothing=0.1)
            b = gt.linear_cross_entropy(h, lin.weight, t, linear_bias=lin.bias)
        return a + b
    eager, custom = both_paths(fn, [x, lin.weight, lin.bias])
    assert_same_bits(eager, custom, "autocast")
    assert eager[0].dtype == torch.float32


# --- which path a call takes --------------------------------------------------------------------

def dispatched(fn):
    """The gpuce custom operators the profiler saw fn dispatch."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return {e.name for e in p.events() if e.name.startswith("gpuce::")}


def test_eager_calls_skip_the_dispatcher():
    x, t, w = ce_case(gen("dispatch"), torch.float64, "prob")
    t = t.detach().requires_grad_()
    h = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def step():
        gt.cross_entropy(x, t, weight=w, reduction="none", return_stats=True)[0].sum().backward()
        gt.linear_cross_entropy(h, W, t, reduction="none").sum().backward()
    assert dispatched(step) == set()
    with _spec.through_custom_ops():
        assert dispatched(step) == {
            "gpuce::cross_entropy", "gpuce::cross_entropy_backward",
            "gpuce::linear_cross_entropy", "gpuce::linear_cross_entropy_backward",
            "gpuce::linear_cross_entropy_target_backward"}


def test_routing_rule():
    """is_eager: plain eager calls yes (a torch.device context included); a fake tensor mode,
    a torch-dispatch or torch-function mode, a functorch transform, a tensor subclass, a
    scalar of another type than annotated, an int beyond int64: no."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    spec = _spec.OPS["cross_entropy"].spec
    x, t, _ = ce_case(gen("rule"), torch.float32, "label")
    args = (x, t, None, "mean", -100, 0.0, 0.0, True, 0.0, False, True)
    assert _spec.is_eager(spec, args)
    assert _spec.is_eager(spec, args[:1] + (torch.nn.Parameter(x.detach()),) + args[2:])
    with torch.device("cpu"):
        assert _spec.is_eager(spec, args)
    for ctx in (FakeTensorMode(), TorchDispatchMode(), TorchFunctionMode(),
                _spec.through_custom_ops()):
        with ctx:
            assert not _spec.is_eager(spec, args), type(ctx).__name__
    seen = []
    torch.vmap(lambda v: seen.append(_spec.is_eager(spec, (v,) + args[1:])) or v)(x.detach()[None])
    assert seen == [False]

    class Sub(torch.Tensor):
        pass
    assert not _spec.is_eager(spec, (x.detach().as_subclass(Sub),) + args[1:])
    import numpy as np
    assert not _spec.is_eager(spec, args[:5] + (np.float64(0.0),) + args[6:])
    assert not _spec.is_eager(spec, args[:5] + (0,) + args[6:])  # an int for a float
    assert not _spec.is_eager(spec, args[:4] + (2 ** 63,) + args[5:])
    assert _spec.is_eager(spec, args[:4] + (2 ** 63 - 1,) + args[5:])
    assert not _spec.is_eager(spec, args[:2] + (None,) * 9)  # None for a str


def test_compiled_calls_go_through_the_custom_operator():
    """A call while compiling takes the custom operator (the compiled graph holds it) and
    gives eager's bits."""
    from torch._dynamo.testing import CompileCounterWithBackend

    x, t, _ = ce_case(gen("compile"), torch.float64, "label")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda a, b: gt.cross_entropy(a, b, z_loss=1e-3) * 2, backend=counter,
                       fullgraph=True)
    got = run(lambda: fn(x, t), [x])
    want = run(lambda: gt.cross_entropy(x, t, z_loss=1e-3) * 2, [x])
    assert counter.frame_count == 1
    targets = {str(n.target) for gm in counter.graphs for n in gm.graph.nodes}
    assert "gpuce.cross_entropy.default" in targets
    assert_same_bits([got[0], got[3]], [want[0], want[3]], "compiled")


# --- the fakes ---------------------------------------------------------------------------------

def fake_cases():
    """Arguments for each production operator (class indices and probabilities, with and
    without gradients and statistics)."""
    g = gen("fakes")
    x, t, w = ce_case(g, torch.float32, "label")
    _, p, _ = ce_case(g, torch.float32, "prob")
    x3 = torch.randn(2, 3, 5, generator=g)
    t3 = torch.randint(0, 5, (2, 3), generator=g)
    h = torch.randn(6, 4, generator=g)
    W = torch.randn(5, 4, generator=g)
    b = torch.randn(5, generator=g)
    go = torch.tensor(0.7)
    rows = torch.linspace(0.5, 1.5, 6)
    bf = torch.bfloat16
    return {
        "cross_entropy": [
            (x, t, w, "mean", -100, 0.1, 0.0, True),
            (x, p, None, "none", -100, 0.0, 0.01, False, 2.0, True, True),
            (x3, t3, None, "none", -100, 0.0, 0.0, True, 0.0, True, True),
            (x.to(bf), t, None, "sum", -100, 0.0, 0.0, True, 0.0, True, True),
            (x, t, None, "mean", -100, 0.0, 0.0, False, 0.0, True, True)],
        "cross_entropy_backward": [
            (go, x, p, w, "mean", -100, 0.1, 0.0, True, True, True),
            (rows, x.to(bf), t, None, "none", -100, 0.0, 0.0, True, False, False, 2.0, True)],
        "linear_cross_entropy": [
            (h, W, t, b, w, "mean", -100, 0.1, 0.0, None, True, True),
            (h, W, p, None, None, "sum", -100, 0.0, 0.01, 4, False, True, 0.0, True, True),
            (h, W, t, b, None, "none", -100, 0.0, 0.0, 4, True, False, 0.0, True, True, True),
            (h.to(bf), W.to(bf), t, None, None, "mean", -100, 0.0, 0.0, None, True, True,
             0.0, False, True, True)],
        "linear_cross_entropy_backward": [
            (rows, h, W, t, b, None, "none", -100, 0.0, 0.0, None, True),
            (go, h, W, p, None, w, "mean", -100, 0.1, 0.01, 4, False)],
        "linear_cross_entropy_target_backward": [
            (go, h, W, p, b, w, "mean", 0.1, 4, True, True),
            (rows, h, W, p, None, w, "none", 0.0, None, False, True, 2.0)],
        "token_logprobs": [
            (x3, t3, 0.7, 0.0, -100, True),
            (x.to(bf), t, 1.0, 3.0, -100, False)],
        "token_logprobs_backward": [
            (rows, None, x, t, 1.2, 0.0, -100),
            (None, rows, x.to(bf), t, 0.9, 2.0, -100)],
        "linear_token_logprobs": [
            (h, W, t, b, 1.0, 0.0, -100, True, None),
            (h.to(bf), W.to(bf), t, None, 0.8, 2.0, -100, False, 4)],
        "linear_token_logprobs_backward": [
            (rows, rows, h, W, t, b, 1.0, 0.0, -100, None, True),
            (None, rows, h.to(bf), W.to(bf), t, None, 0.7, 0.0, -100, 2, False)],
        "distillation_loss": [
            (x, x.flip(0), None, t, 0.5, 1.0, -100, "mean", 0.0, True),
            (x3, x3 * 2, None, None, 1.0, 0.8, -100, "none", 3.0, True),
            (x.to(bf), x.to(bf), None, t, 0.0, 1.0, -100, "sum", 0.0, False)],
        "distillation_loss_backward": [
            (rows, x, x.flip(0), None, t, 0.2, 1.0, -100, "none", 0.0),
            (go, x.to(bf), x, None, None, 1.0, 1.5, -100, "mean", 2.0)],
        "linear_distillation_loss": [
            (h, W, h * 2, W, t, b, None, 0.0, 1.0, -100, "mean", 0.0, None, True, True),
            (h, W, h, W * 0.5, None, None, b, 0.5, 0.9, -100, "none", 0.0, 2, True, True),
            (h.to(bf), W.to(bf), h, W, t, None, None, 1.0, 1.0, -100, "sum", 2.0, None, False,
             True)],
        "linear_distillation_loss_backward": [
            (rows, h, W, h * 2, W, t, b, None, 0.0, 1.0, -100, "none", 0.0, None, True),
            (go, h.to(bf), W.to(bf), h, W, None, None, None, 1.0, 0.8, -100, "mean", 0.0, 2,
             False)],
    }


def test_each_fake_matches_its_real_outputs():
    """For every production operator: the fake's outputs have the real outputs' shapes and
    dtypes, called directly and under FakeTensorMode through the operator."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = fake_cases()
    production = {n for n, op in _spec.OPS.items() if not n.startswith("selftest")}
    assert production == set(cases)
    for name, arg_sets in cases.items():
        op = _spec.OPS[name]
        for args in arg_sets:
            real = op.spec.impl(*args)
            fake = op.spec.fake(*args)
            assert [(r.shape, r.dtype) for r in real] == [(f.shape, f.dtype) for f in fake], name
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
                traced = op(*fargs)
            assert [(r.shape, r.dtype) for r in real] == [(f.shape, f.dtype) for f in traced], name


# --- the spec itself ---------------------------------------------------------------------------

def _square_impl(x: torch.Tensor, scale: float, with_sum: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    y = x * x * scale
    return y, (y.sum(-1) if with_sum else x.new_empty((0,)))


def _square_fake(x, scale, with_sum=False):
    return x.new_empty(x.shape), (x.new_empty(x.shape[:-1]) if with_sum else x.new_empty((0,)))


def _square_setup(ctx, inputs, output):
    x, scale, _ = inputs
    ctx.save_for_backward(x)
    ctx.scale = scale
    ctx.set_materialize_grads(False)  # None for an output not used


def _square_backward(ctx, g_y, g_sum):
    (x,) = ctx.saved_tensors
    g = g_y if g_y is not None else torch.zeros_like(x)
    if g_sum is not None:
        g = g + g_sum.unsqueeze(-1)
    return (SQUARE_BACKWARD(g, x, ctx.scale)[0],)  # one gradient: padded for scale, with_sum


def _square_backward_impl(g: torch.Tensor, x: torch.Tensor, scale: float
                          ) -> tuple[torch.Tensor]:
    return (g * x * (2.0 * scale),)


def _square_backward_fake(g, x, scale):
    return (x.new_empty(x.shape),)


SQUARE = _spec.define(_spec.OpSpec("selftest_scaled_square", impl=_square_impl,
                                   fake=_square_fake, setup_context=_square_setup,
                                   backward=_square_backward))
SQUARE_BACKWARD = _spec.define(_spec.OpSpec(
    "selftest_scaled_square_backward", impl=_square_backward_impl, fake=_square_backward_fake,
    first_order_of="selftest_scaled_square"))


def test_a_new_operator_is_one_spec_entry():
    """A toy operator defined by its spec: the custom operator exists with the spec's inputs
    (a default filled in), its eager and compiled calls agree in bits with a float64
    reference's values, its gradient is padded for the options and refuses double backward."""
    assert SQUARE.spec.inputs == ("x", "scale", "with_sum")
    assert SQUARE.spec.defaults == (False,)
    assert SQUARE.overload is torch.ops.gpuce.selftest_scaled_square.default
    x = torch.randn(3, 4, dtype=torch.float64, generator=gen("square"), requires_grad=True)
    y, s = SQUARE(x, 1.5, True)
    assert type(y.grad_fn).__name__ == "SelftestScaledSquareEagerBackward"
    torch.testing.assert_close(y, 1.5 * x.detach() ** 2, rtol=1e-15, atol=0)
    (gx,) = torch.autograd.grad((y * 2).sum() + s.sum(), x)
    torch.testing.assert_close(gx, 9.0 * x.detach(), rtol=1e-15, atol=0)
    torch._dynamo.reset()
    fn = torch.compile(lambda v: SQUARE(v, 1.5, True), backend="aot_eager", fullgraph=True)
    yc, sc = fn(x)
    (gc,) = torch.autograd.grad((yc * 2).sum() + sc.sum(), x)
    assert torch.equal(yc, y) and torch.equal(sc, s) and torch.equal(gc, gx)
    y1, s1 = SQUARE(x, 2.0)  # with_sum defaults to False
    assert s1.numel() == 0 and torch.equal(y1, 2.0 * x.detach() ** 2)
    (g2,) = torch.autograd.grad(SQUARE(x, 1.0)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiating selftest_scaled_square's gradient"):
        g2.sum().backward()
    with pytest.raises(TypeError, match="at least 2 arguments"):
        SQUARE(x)
    with pytest.raises(Exception) as extra:
        SQUARE(x, 1.0, True, 4)
    with pytest.raises(Exception) as extra_custom:
        SQUARE.custom(x, 1.0, True, 4)
    assert type(extra.value) is type(extra_custom.value)


def test_spec_checks():
    def impl(x: torch.Tensor, k: int) -> tuple[torch.Tensor]:
        return (x,)

    with pytest.raises(TypeError, match="fake's parameters"):
        _spec.OpSpec("selftest_bad", impl=impl, fake=lambda x: (x,), first_order_of="x")
    with pytest.raises(TypeError, match="setup_context and backward"):
        _spec.OpSpec("selftest_bad", impl=impl, fake=lambda x, k: (x,),
                     backward=lambda ctx, g: (g,))
    with pytest.raises(TypeError, match="first_order_of"):
        _spec.OpSpec("selftest_bad", impl=impl, fake=lambda x, k: (x,))

    def impl_list(x: torch.Tensor, ks: list[int]) -> tuple[torch.Tensor]:
        return (x,)
    with pytest.raises(TypeError, match="unsupported annotation"):
        _spec.OpSpec("selftest_bad", impl=impl_list, fake=lambda x, ks: (x,), first_order_of="x")
    with pytest.raises(ValueError, match="defined already"):
        _spec.define(SQUARE.spec)
