"""gpuce.torch.distillation_loss and linear_distillation_loss against autograd of a float64
reference written here from the definitions (forward KL, reverse KL, the generalised JSD,
the sparse top-k teacher over its support): every beta, temperatures, softcap, ignored rows,
every reduction, the linear form (and finite differences of it), student == teacher, extreme
rows, 16-bit against float64 of the same values, a teacher that requires grad, the custom
operators (opcheck, the dispatcher path, torch.compile fullgraph) and errors."""

import pytest

torch = pytest.importorskip("torch")

import gpuce.torch as gt  # noqa: E402
from gpuce.torch import _spec  # noqa: E402
from helpers import seed_of, torch_devices  # noqa: E402

IGNORE = -100


def gen(*parts):
    return torch.Generator().manual_seed(seed_of("torch-distill", *parts))


def _plogq(p, lp, lq):
    """p (log p − log q) with 0 where p is 0."""
    return torch.where(p > 0, p * (lp - lq), torch.zeros((), dtype=p.dtype))


def rows_reference(S, T, beta, tau=1.0, softcap=None):
    """Each row's loss from the definitions, in S's dtype (float64 in the tests)."""
    cap = (lambda f: softcap * torch.tanh(f / softcap)) if softcap else (lambda f: f)
    ls = torch.log_softmax(cap(S) / tau, -1)
    lt = torch.log_softmax(cap(T) / tau, -1)
    ps, pt = ls.exp(), lt.exp()
    if beta == 0:
        return _plogq(pt, lt, ls).sum(-1)
    if beta == 1:
        return _plogq(ps, ls, lt).sum(-1)
    lm = torch.log(beta * pt + (1 - beta) * ps)
    return beta * _plogq(pt, lt, lm).sum(-1) + (1 - beta) * _plogq(ps, ls, lm).sum(-1)


def sparse_rows_reference(S, idx, logp, tau=1.0):
    ls = torch.log_softmax(S / tau, -1).gather(-1, idx)
    return _plogq(logp.exp(), logp, ls).sum(-1)


def reduce(rows, target, reduction):
    if target is not None:
        rows = torch.where(target != IGNORE, rows, torch.zeros((), dtype=rows.dtype))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    n = rows.numel() if target is None else int((target != IGNORE).sum())
    return rows.sum() / n if n else rows.sum() * 0


def incoming(loss, g):
    return torch.rand(loss.shape, generator=g, dtype=loss.dtype) + 0.5 if loss.dim() else \
        torch.tensor(1.7, dtype=loss.dtype)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("device", torch_devices(torch))
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("tau,softcap", [(1.0, None), (0.7, None), (2.0, 6.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_against_the_reference(device, beta, tau, softcap, reduction):
    g = gen("dense", beta, tau, softcap, reduction)
    lead, c = (3, 4), 29
    S = (torch.randn(*lead, c, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_()
    T = (torch.randn(*lead, c, generator=g, dtype=torch.float64) * 2).to(device)
    t = torch.randint(0, c, lead, generator=g)
    t.view(-1)[::4] = IGNORE
    t = t.to(device)
    got = gt.distillation_loss(S, T, t, beta=beta, temperature=tau, softcap=softcap,
                               reduction=reduction)
    want = reduce(rows_reference(S, T, beta, tau, softcap), t, reduction)
    assert got.dtype == torch.float64 and got.shape == want.shape
    close(got, want, "loss")
    go = incoming(want, g).to(device)
    close(torch.autograd.grad(got, S, go)[0], torch.autograd.grad(want, S, go)[0], "gradient")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_without_a_target_and_the_sparse_teacher(reduction):
    g = gen("sparse", reduction)
    n, c, k = 7, 40, 5
    S = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    T = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    lt, idx = torch.log_softmax(T, -1).topk(k, -1)
    got = gt.distillation_loss(S, (idx, lt), reduction=reduction, temperature=0.8)
    want = reduce(sparse_rows_reference(S, idx, lt, 0.8), None, reduction)
    close(got, want, "sparse loss")
    go = incoming(want, g)
    close(torch.autograd.grad(got, S, go)[0], torch.autograd.grad(want, S, go)[0], "sparse gradient")


def test_the_backward_does_not_check_the_labels_again(monkeypatch):
    """The target is checked once, by the forward (on CUDA each check is a host sync); the
    backward reruns the rows without it, eager and through the custom operators."""
    import gpuce.distillation as D

    checked = []
    real = D._active_rows
    monkeypatch.setattr(D, "_active_rows", lambda xp, t, args, check=True: checked.append(check) or
                        real(xp, t, args, check))
    g = gen("checked")
    S = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    T = torch.randn(4, 9, generator=g, dtype=torch.float64)
    xs = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    xt, wt = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([1, IGNORE, 8, 0])

    def run():  # reduction "none": the backward runs the rows again (a mean scales a saved one)
        gt.distillation_loss(S, T, t, reduction="none").sum().backward()
        gt.linear_distillation_loss(xs, ws, xt, wt, t, reduction="none").sum().backward()
        assert checked == [True, False, True, False]  # forward checks, backward does not
        checked.clear()

    run()
    with _spec.through_custom_ops():
        run()


def test_student_equal_to_teacher_gives_zero():
    g = gen("equal")
    S = torch.randn(6, 17, generator=g, dtype=torch.float64) * 5
    for beta in (0.0, 0.3, 1.0):
        s = S.clone().requires_grad_()
        loss = gt.distillation_loss(s, S, beta=beta, temperature=1.3)
        (d,) = torch.autograd.grad(loss, s)
        assert abs(loss.item()) < 1e-14 and d.abs().max().item() < 1e-15


def test_extreme_rows_stay_finite():
    c = 30
    S = torch.zeros(4, c, dtype=torch.float64)
    T = torch.zeros(4, c, dtype=torch.float64)
    S[0] = torch.linspace(-1e4, 1e4, c)
    T[0] = -S[0]
    S[1, 3], T[1, 7] = 1e300, 1e300
    S[2, :5] = float("-inf")
    T[3] = torch.linspace(-50, 50, c)
    for beta in (0.0, 0.5, 1.0):
        s = S.clone().requires_grad_()
        loss = gt.distillation_loss(s, T, beta=beta, reduction="none")
        rows = rows_reference(S, T, beta)
        finite = [0, 1, 3] if beta == 0 else [0, 1, 2, 3]
        # row 2: the student gives probability 0 where the teacher has mass, KL(p_T || p_S) = inf
        assert torch.isfinite(loss[finite]).all() and (loss >= -1e-12).all()
        if beta == 0:
            assert loss[2] == float("inf")
        close(loss[[0, 2, 3] if beta else [0, 3]], rows[[0, 2, 3] if beta else [0, 3]],
              f"beta {beta}")
        d = torch.autograd.grad(loss[finite].sum(), s)[0]
        assert torch.isfinite(d).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_16_bit_against_float64_of_the_same_values(dtype, reduction):
    pytest.importorskip("ml_dtypes")
    g = gen("16", str(dtype), reduction)
    S = (torch.randn(12, 200, generator=g) * 3).to(dtype).requires_grad_()
    T = (torch.randn(12, 200, generator=g) * 3).to(dtype)
    loss = gt.distillation_loss(S, T, beta=0.5, temperature=0.9, reduction=reduction)
    assert loss.dtype == torch.float32
    S64 = S.detach().double().requires_grad_()
    want = gt.distillation_loss(S64, T.double(), beta=0.5, temperature=0.9, reduction=reduction)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    go = incoming(want, g)
    (d,) = torch.autograd.grad(loss, S, go.float())
    (d64,) = torch.autograd.grad(want, S64, go)
    assert d.dtype == dtype
    torch.testing.assert_close(d.double(), d64, rtol=torch.finfo(dtype).eps, atol=1e-7)


@pytest.mark.parametrize("device", torch_devices(torch))
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias,chunk_size", [(True, None), (False, 3)])
def test_linear_against_the_reference(device, beta, reduction, bias, chunk_size):
    g = gen("linear", beta, reduction, bias, chunk_size)
    lead, ds, dt, c = (2, 5), 6, 9, 21
    xs = torch.randn(*lead, ds, generator=g, dtype=torch.float64).to(device).requires_grad_()
    ws = (torch.randn(c, ds, generator=g, dtype=torch.float64) * 0.6).to(device).requires_grad_()
    xt = torch.randn(*lead, dt, generator=g, dtype=torch.float64).to(device)
    wt = (torch.randn(c, dt, generator=g, dtype=torch.float64) * 0.6).to(device)
    bs = torch.randn(c, generator=g, dtype=torch.float64).to(device).requires_grad_() if bias else None
    bt = torch.randn(c, generator=g, dtype=torch.float64).to(device) if bias else None
    t = torch.randint(0, c, lead, generator=g)
    t[0, 1] = IGNORE
    t = t.to(device)
    got = gt.linear_distillation_loss(xs, ws, xt, wt, t, student_bias=bs, teacher_bias=bt,
                                      chunk_size=chunk_size, beta=beta, temperature=1.4,
                                      reduction=reduction, softcap=8.0)
    F = torch.nn.functional
    want = reduce(rows_reference(F.linear(xs, ws, bs), F.linear(xt, wt, bt), beta, 1.4, 8.0),
                  t, reduction)
    close(got, want, "loss")
    leaves = (xs, ws) + ((bs,) if bias else ())
    go = incoming(want, g).to(device)
    for name, a, b in zip(("x", "W", "b"), torch.autograd.grad(got, leaves, go),
                          torch.autograd.grad(want, leaves, go)):
        close(a, b, f"d{name}")


def test_linear_finite_differences():
    g = gen("fd")
    xs = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bs = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(5, 3, generator=g, dtype=torch.float64)
    wt = torch.randn(9, 3, generator=g, dtype=torch.float64)
    for beta in (0.0, 0.5, 1.0):
        assert torch.autograd.gradcheck(
            lambda a, b, c: gt.linear_distillation_loss(a, b, xt, wt, student_bias=c, beta=beta,
                                                        temperature=0.8, chunk_size=2),
            (xs, ws, bs))


def test_a_teacher_that_requires_grad_raises():
    g = gen("teacher-grad")
    S = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    T = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="detach"):
        gt.distillation_loss(S, T)
    gt.distillation_loss(S, T.detach()).backward()  # detached: fine
    with torch.no_grad():
        gt.distillation_loss(S, T)  # no autograd: fine
    xs, ws = torch.randn(3, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="teacher_weight"):
        gt.linear_distillation_loss(xs, ws, xs, ws.clone().requires_grad_())


def test_bad_input():
    S = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="beta"):
        gt.distillation_loss(S, S, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        gt.distillation_loss(S, S, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        gt.distillation_loss(S, S[:, :4])
    with pytest.raises(ValueError):
        gt.distillation_loss(S, S, torch.tensor([0, 5, 1]))  # label 5 outside [0, 5)
    with pytest.raises(ValueError, match="reduction"):
        gt.distillation_loss(S, S, reduction="avg")
    with pytest.raises(TypeError, match="dtype"):
        gt.distillation_loss(S.long(), S)
    with pytest.raises(ValueError, match="rows"):
        gt.linear_distillation_loss(S, S, S[:2], S)


# --- the operators ------------------------------------------------------------------------------

def _operands(g):
    S = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    T = torch.randn(4, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([1, IGNORE, 5, 0])
    xs = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bs = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(4, 2, generator=g, dtype=torch.float64)
    wt = torch.randn(6, 2, generator=g, dtype=torch.float64)
    return S, T, t, xs, ws, bs, xt, wt


def test_opcheck():
    from torch.library import opcheck

    ops = torch.ops.gpuce
    S, T, t, xs, ws, bs, xt, wt = _operands(gen("opcheck"))
    lt, idx = torch.log_softmax(T, -1).topk(3, -1)
    for args in [(S, T, None, t, 0.5, 1.0, IGNORE, "mean", 0.0, True),
                 (S, T, None, None, 1.0, 0.7, IGNORE, "none", 4.0, True),
                 (S, lt, idx, t, 0.0, 1.2, IGNORE, "sum", 0.0, False)]:
        opcheck(ops.distillation_loss.default, args)
    go = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)
    opcheck(ops.distillation_loss_backward.default,
            (go, S.detach(), T, None, t, 0.3, 0.9, IGNORE, "none", 0.0))
    for args in [(xs, ws, xt, wt, t, bs, None, 0.0, 1.0, IGNORE, "mean", 0.0, None, True, True),
                 (xs, ws, xt, wt, None, None, None, 0.5, 0.8, IGNORE, "none", 3.0, 2, True, True)]:
        opcheck(ops.linear_distillation_loss.default, args)
    opcheck(ops.linear_distillation_loss_backward.default,
            (go, xs.detach(), ws.detach(), xt, wt, t, bs.detach(), None, 1.0, 1.0, IGNORE, "none",
             0.0, None, True))


def test_dispatcher_path_equals_the_eager_path():
    S, T, t, xs, ws, bs, xt, wt = _operands(gen("paths"))

    def run():
        a = gt.distillation_loss(S, T, t, beta=0.4, temperature=0.9, reduction="none")
        b = gt.linear_distillation_loss(xs, ws, xt, wt, t, student_bias=bs, beta=1.0)
        go = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)
        return (a, b) + torch.autograd.grad(a, S, go) + torch.autograd.grad(b, (xs, ws, bs))

    eager = run()
    with _spec.through_custom_ops():
        custom = run()
    for a, c in zip(eager, custom):
        assert torch.equal(a, c)


def test_torch_compile_fullgraph():
    from torch._dynamo.testing import CompileCounterWithBackend

    S, T, t, xs, ws, bs, xt, wt = _operands(gen("compile"))

    def step(S, xs, ws, bs):
        a = gt.distillation_loss(S * 2, T, t, beta=0.5, temperature=0.9, reduction="none")
        b = gt.linear_distillation_loss(torch.tanh(xs), ws, xt, wt, t, student_bias=bs)
        return (a * torch.arange(4, dtype=a.dtype)).sum() + 3 * b

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    fn = torch.compile(step, backend=counter, fullgraph=True)
    leaves = (S, xs, ws, bs)
    got = fn(*leaves)
    got_g = torch.autograd.grad(got, leaves)
    assert counter.frame_count == 1
    want = step(*leaves)
    want_g = torch.autograd.grad(want, leaves)
    close(got, want, "compiled loss")
    for a, b in zip(got_g, want_g):
        close(a, b, "compiled gradient")


def test_double_backward_raises():
    S, T, *_ = _operands(gen("double"))
    (d,) = torch.autograd.grad(gt.distillation_loss(S, T), S, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        d.sum().backward()
