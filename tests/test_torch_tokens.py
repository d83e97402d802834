"""gpuce.torch.token_logprobs and linear_token_logprobs against autograd of the materialised
torch reference written here (tempered, capped log_softmax, gather, entropy): values and
gradients for random incoming gradients (g_logp, g_H), every option, ignored rows, extreme
rows, bfloat16 against float64 of the same values, the custom operators (opcheck, the
dispatcher path, torch.compile fullgraph), errors, and a GRPO-style toy whose parameters
after a few steps agree with the reference's to rounding."""

import math

import pytest

torch = pytest.importorskip("torch")

import gpuce.torch as gt  # noqa: E402
from gpuce.torch import _spec  # noqa: E402
from helpers import seed_of, torch_devices  # noqa: E402

IGNORE = -100


def gen(*parts):
    return torch.Generator().manual_seed(seed_of("torch-tokens", *parts))


def reference(f, target, temperature=1.0, softcap=None, ignore_index=IGNORE):
    """log p and H of the (capped, tempered) logits by torch's own functions, float64;
    ignored rows 0."""
    v = softcap * torch.tanh(f / softcap) if softcap else f
    ls = torch.log_softmax(v / temperature, dim=-1)
    active = target != ignore_index
    k = torch.where(active, target, torch.zeros_like(target))
    logp = ls.gather(-1, k.unsqueeze(-1)).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    zero = torch.zeros((), dtype=f.dtype)
    return torch.where(active, logp, zero), torch.where(active, ent, zero)


def linear_reference(x, w, target, bias=None, **kw):
    return reference(torch.nn.functional.linear(x, w, bias), target, **kw)


def tokens(g, lead, c, ignored=True):
    t = torch.randint(0, c, lead, generator=g)
    if ignored:
        t.view(-1)[::5] = IGNORE
    return t


def objective(logp, ent, gl, gh):
    """Σ g_logp log p + g_H H (None: that output unused)."""
    out = (logp * gl).sum()
    return out if ent is None else out + (ent * gh).sum()


def grads(outputs, leaves, gl, gh):
    logp, ent = outputs if isinstance(outputs, tuple) else (outputs, None)
    return torch.autograd.grad(objective(logp, ent, gl, gh), leaves)


def close(a, b, dtype=torch.float64, what=""):
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


# --- values and gradients ----------------------------------------------------------------------

@pytest.mark.parametrize("device", torch_devices(torch))
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("return_entropy", [True, False])
def test_token_logprobs_against_the_reference(device, temperature, softcap, return_entropy):
    g = gen("logits", temperature, softcap, return_entropy)
    lead, c = (3, 4), 37
    f = (torch.randn(*lead, c, generator=g, dtype=torch.float64) * 3).to(device).requires_grad_()
    t = tokens(g, lead, c).to(device)
    gl = torch.randn(lead, generator=g, dtype=torch.float64).to(device)
    gh = torch.randn(lead, generator=g, dtype=torch.float64).to(device)
    out = gt.token_logprobs(f, t, temperature=temperature, softcap=softcap,
                            return_entropy=return_entropy)
    want = reference(f, t, temperature, softcap)
    got = out if return_entropy else (out, None)
    assert got[0].dtype == torch.float64 and got[0].shape == lead
    close(got[0], want[0], what="logp")
    if return_entropy:
        close(got[1], want[1], what="entropy")
    want_g = grads(want if return_entropy else want[0], (f,), gl, gh)
    close(grads(out, (f,), gl, gh)[0], want_g[0], what="gradient")
    assert torch.all(got[0][t == IGNORE] == 0)


@pytest.mark.parametrize("used", ["logp", "entropy"])
def test_only_one_output_differentiated(used):
    g = gen("one", used)
    f = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = tokens(g, (6,), 9)
    logp, ent = gt.token_logprobs(f, t, temperature=0.8, return_entropy=True)
    rl, rh = reference(f, t, 0.8)
    got = torch.autograd.grad((logp if used == "logp" else ent).sum(), f)[0]
    want = torch.autograd.grad((rl if used == "logp" else rh).sum(), f)[0]
    close(got, want, what=used)


@pytest.mark.parametrize("device", torch_devices(torch))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.6, 3.0)])
def test_linear_token_logprobs_against_the_reference(device, bias, chunk_size, temperature,
                                                     softcap):
    g = gen("linear", bias, chunk_size, temperature, softcap)
    lead, d, c = (2, 5), 6, 23
    x = torch.randn(*lead, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = (torch.randn(c, d, generator=g, dtype=torch.float64) * 0.7).to(device).requires_grad_()
    b = (torch.randn(c, generator=g, dtype=torch.float64).to(device).requires_grad_()
         if bias else None)
    t = tokens(g, lead, c).to(device)
    gl = torch.randn(lead, generator=g, dtype=torch.float64).to(device)
    gh = torch.randn(lead, generator=g, dtype=torch.float64).to(device)
    leaves = (x, w) + ((b,) if bias else ())
    out = gt.linear_token_logprobs(x, w, t, bias=b, temperature=temperature, softcap=softcap,
                                   return_entropy=True, chunk_size=chunk_size)
    want = linear_reference(x, w, t, b, temperature=temperature, softcap=softcap)
    close(out[0], want[0], what="logp")
    close(out[1], want[1], what="entropy")
    for name, a, r in zip("xwb", grads(out, leaves, gl, gh), grads(want, leaves, gl, gh)):
        close(a, r, what=f"d{name}")


def test_linear_only_the_head_requires_grad():
    g = gen("head-only")
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    w = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = tokens(g, (7,), 11)
    logp = gt.linear_token_logprobs(x, w, t, temperature=1.3)
    rl, _ = linear_reference(x, w, t, temperature=1.3)
    close(torch.autograd.grad(logp.sum(), w)[0], torch.autograd.grad(rl.sum(), w)[0], what="dW")


def test_extreme_rows_stay_finite_and_entropy_within_its_bounds():
    c = 50
    f = torch.zeros(6, c, dtype=torch.float64)
    f[0] = torch.linspace(-1e4, 1e4, c)  # one class takes it all
    f[1, 3] = 1e300
    f[2, :] = -1e300  # ties at a huge negative value
    f[3, :10] = float("-inf")  # -inf entries, the rest ties
    f[4] = torch.linspace(-30, 30, c)
    f[5, ::2] = 7.0  # ties of two values
    t = torch.tensor([c - 1, 3, 0, 20, 0, 1])
    for tau in (0.3, 1.0, 4.0):
        logp, ent = gt.token_logprobs(f, t, temperature=tau, return_entropy=True)
        assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
        assert (logp <= 0).all()
        assert (ent >= -1e-12).all() and (ent <= math.log(c) + 1e-12).all()
        close(ent[2], torch.tensor(math.log(c), dtype=torch.float64), what="uniform row")
        close(ent[3], torch.tensor(math.log(c - 10), dtype=torch.float64), what="-inf entries")
    f.requires_grad_()
    logp, ent = gt.token_logprobs(f, t, return_entropy=True)
    d = torch.autograd.grad(logp.sum() + ent.sum(), f)[0]
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_against_float64_of_the_same_values(dtype):
    pytest.importorskip("ml_dtypes")
    g = gen("16bit", str(dtype))
    f = (torch.randn(16, 300, generator=g) * 4).to(dtype).requires_grad_()
    t = tokens(g, (16,), 300)
    gl = torch.randn(16, generator=g)
    gh = torch.randn(16, generator=g)
    logp, ent = gt.token_logprobs(f, t, temperature=0.9, return_entropy=True)
    assert logp.dtype == ent.dtype == torch.float32
    f64 = f.detach().double().requires_grad_()
    want = reference(f64, t, 0.9)
    torch.testing.assert_close(logp.double(), want[0], rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(ent.double(), want[1], rtol=2e-6, atol=2e-5)
    d = grads((logp, ent), (f,), gl, gh)[0]
    assert d.dtype == dtype
    d64 = grads(want, (f64,), gl.double(), gh.double())[0]
    # rounded once from float32: within half a 16-bit ulp of the float64 gradient (+ float32 noise)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(d.double(), d64, rtol=eps, atol=1e-6)


def test_linear_bfloat16_outputs_float32():
    pytest.importorskip("ml_dtypes")
    g = gen("linear-bf16")
    x = torch.randn(9, 16, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(40, 16, generator=g) * 0.3).bfloat16().requires_grad_()
    t = tokens(g, (9,), 40)
    logp, ent = gt.linear_token_logprobs(x, w, t, return_entropy=True, chunk_size=4)
    assert logp.dtype == ent.dtype == torch.float32
    x64, w64 = (v.detach().double().requires_grad_() for v in (x, w))
    want = linear_reference(x64, w64, t)
    # bf16 GEMM inputs, float32 accumulation: the logits are within float32 rounding
    torch.testing.assert_close(logp.double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), want[1], rtol=1e-5, atol=1e-5)
    dx, dw = torch.autograd.grad(logp.sum() + ent.sum(), (x, w))
    rx, rw = torch.autograd.grad(want[0].sum() + want[1].sum(), (x64, w64))
    assert dx.dtype == dw.dtype == torch.bfloat16
    # the GEMMs take 16-bit inputs (G rounded to bfloat16 once, float32 accumulation), and the
    # results are rounded once: |error| <= (|G| |W| or |G|ᵀ |X|) 2^-8 + |result| 2^-8, with G
    # the float64 gradient with respect to the logits
    f64 = (x64 @ w64.T).detach().requires_grad_()
    lf = reference(f64, t)
    (G,) = torch.autograd.grad(lf[0].sum() + lf[1].sum(), f64)
    u = 2.0 ** -8
    bx = G.abs() @ w64.detach().abs() * u + rx.abs() * u + 1e-6
    bw = G.abs().T @ x64.detach().abs() * u + rw.abs() * u + 1e-6
    assert ((dx.double() - rx).abs() <= bx).all()
    assert ((dw.double() - rw).abs() <= bw).all()


def test_autocast_runs_the_head_in_autocasts_dtype():
    pytest.importorskip("ml_dtypes")
    g = gen("autocast")
    x = torch.randn(5, 8, generator=g)
    w = torch.randn(12, 8, generator=g)
    t = tokens(g, (5,), 12, ignored=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gt.linear_token_logprobs(x, w, t)
    want = gt.linear_token_logprobs(x.bfloat16(), w.bfloat16(), t)
    assert torch.equal(got, want)


# --- the operators ------------------------------------------------------------------------------

def _cases(g):
    f = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, IGNORE, 6, 0])
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    return f, t, x, w, b


def test_dispatcher_path_equals_the_eager_path():
    f, t, x, w, b = _cases(gen("paths"))
    gl, gh = torch.linspace(0.5, 1.5, 4, dtype=torch.float64), torch.linspace(-1, 1, 4, dtype=torch.float64)

    def run():
        a = gt.token_logprobs(f, t, temperature=0.7, softcap=3.0, return_entropy=True)
        c = gt.linear_token_logprobs(x, w, t, bias=b, temperature=1.2, return_entropy=True)
        return a + c + grads(a, (f,), gl, gh) + grads(c, (x, w, b), gl, gh)

    eager = run()
    with _spec.through_custom_ops():
        custom = run()
    for a, c in zip(eager, custom):
        assert torch.equal(a, c)


def test_the_backward_does_not_check_the_labels_again(monkeypatch):
    """The labels are checked once, by the forward (on CUDA each check is a host sync); the
    backward reruns the rows without it, through both the eager and the dispatcher path."""
    import gpuce.tokens

    checks = []
    real = gpuce.tokens.check_labels
    monkeypatch.setattr(gpuce.tokens, "check_labels", lambda *a: checks.append(1) or real(*a))
    f, t, x, w, b = _cases(gen("checked"))
    gl, gh = torch.linspace(0.5, 1.5, 4, dtype=torch.float64), torch.linspace(-1, 1, 4, dtype=torch.float64)

    def run():
        a = gt.token_logprobs(f, t, return_entropy=True)
        c = gt.linear_token_logprobs(x, w, t, bias=b, return_entropy=True)
        assert len(checks) == 2  # the two forwards
        grads(a, (f,), gl, gh)
        grads(c, (x, w, b), gl, gh)
        assert len(checks) == 2  # no more in the backwards
        checks.clear()

    run()
    with _spec.through_custom_ops():
        run()


def test_opcheck():
    from torch.library import opcheck

    ops = torch.ops.gpuce
    f, t, x, w, b = _cases(gen("opcheck"))
    for args in [(f, t, 1.0, 0.0, IGNORE, True), (f, t, 0.6, 2.5, IGNORE, False)]:
        opcheck(ops.token_logprobs.default, args)
    gl = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)
    opcheck(ops.token_logprobs_backward.default, (gl, None, f.detach(), t, 0.8, 0.0, IGNORE))
    opcheck(ops.token_logprobs_backward.default, (gl, gl.flip(0), f.detach(), t, 1.0, 3.0, IGNORE))
    for args in [(x, w, t, b, 1.0, 0.0, IGNORE, True, None), (x, w, t, None, 0.7, 2.0, IGNORE, False, 2)]:
        opcheck(ops.linear_token_logprobs.default, args)
    opcheck(ops.linear_token_logprobs_backward.default,
            (gl, gl.flip(0), x.detach(), w.detach(), t, b.detach(), 1.0, 0.0, IGNORE, None, True))
    opcheck(ops.linear_token_logprobs_backward.default,
            (None, gl, x.detach(), w.detach(), t, None, 0.9, 0.0, IGNORE, 2, False))


def test_torch_compile_fullgraph():
    from torch._dynamo.testing import CompileCounterWithBackend

    f, t, x, w, b = _cases(gen("compile"))
    gl, gh = torch.linspace(0.5, 1.5, 4, dtype=torch.float64), torch.linspace(-1, 1, 4, dtype=torch.float64)

    def step(f, x, w, b):
        lp, h = gt.token_logprobs(f * 1.5, t, temperature=0.7, return_entropy=True)
        lq, hq = gt.linear_token_logprobs(torch.tanh(x), w, t, bias=b, temperature=1.1,
                                          softcap=5.0, return_entropy=True)
        return (lp * gl).sum() + (h * gh).sum() + (lq * gh).sum() + (hq * gl).sum()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    fn = torch.compile(step, backend=counter, fullgraph=True)
    leaves = (f, x, w, b)
    got = fn(*leaves)
    got_g = torch.autograd.grad(got, leaves)
    assert counter.frame_count == 1
    want = step(*leaves)
    want_g = torch.autograd.grad(want, leaves)
    close(got, want, what="compiled objective")
    for a, r in zip(got_g, want_g):
        close(a, r, what="compiled gradient")


def test_double_backward_raises():
    f, t, x, w, b = _cases(gen("double"))
    lp = gt.token_logprobs(f, t)
    (d,) = torch.autograd.grad(lp.sum(), f, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        d.sum().backward()


def test_bad_input():
    f, t, x, w, b = _cases(gen("errors"))
    with pytest.raises(ValueError, match="temperature"):
        gt.token_logprobs(f, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        gt.linear_token_logprobs(x, w, t, temperature=float("inf"))
    with pytest.raises(ValueError, match="softcap"):
        gt.token_logprobs(f, t, softcap=-1.0)
    with pytest.raises(ValueError):
        gt.token_logprobs(f, torch.tensor([1, 2, 7, 0]))  # 7 is outside [0, 7)
    with pytest.raises(ValueError):
        gt.linear_token_logprobs(x, w, torch.tensor([1, 2, -1, 0]))
    with pytest.raises(TypeError, match="integer"):
        gt.token_logprobs(f, t.double())
    with pytest.raises(ValueError, match="shape"):
        gt.token_logprobs(f, t[:3])
    with pytest.raises(TypeError, match="dtype"):
        gt.token_logprobs(f.detach().long(), t)
    with pytest.raises(ValueError, match="weight"):
        gt.linear_token_logprobs(x, w[0], t)
    with pytest.raises(TypeError, match="return_entropy"):
        gt.token_logprobs(f, t, return_entropy=1)
    before = f.detach().clone()
    gt.token_logprobs(f, t, return_entropy=True)[0].sum().backward()
    assert torch.equal(f.detach(), before)  # the caller's tensor is untouched


# --- a GRPO-style toy ---------------------------------------------------------------------------

def grpo_loss(logp, ent, old_logp, advantages, mask, clip=0.2, entropy_bonus=0.01):
    """The clipped-ratio surrogate plus an entropy bonus, averaged over the tokens kept."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages,
                              torch.clamp(ratio, 1 - clip, 1 + clip) * advantages)
    per_token = -(surrogate + entropy_bonus * ent)
    return (per_token * mask).sum() / mask.sum()


def train(logprobs, steps=6, lr=0.5):
    """A tiny policy (a linear head with a bias over fixed features) improved for a few
    steps; ``logprobs(features, W, b, tokens)`` gives (log p, H)."""
    g = gen("grpo")
    n, d, v = 48, 8, 19
    features = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = (torch.randn(v, d, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    b = torch.zeros(v, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, v, (n,), generator=g)
    actions[::7] = IGNORE  # padding
    mask = (actions != IGNORE).double()
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    advantages = (advantages - advantages.mean()) / advantages.std()
    with torch.no_grad():
        old_logp, _ = logprobs(features, W, b, actions)
    opt = torch.optim.SGD([W, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        logp, ent = logprobs(features, W, b, actions)
        grpo_loss(logp, ent, old_logp, advantages, mask).backward()
        opt.step()
    return W.detach(), b.detach()


def test_grpo_toy_agrees_with_the_materialised_reference():
    tau = 0.9

    def with_gpuce(x, W, b, a):
        return gt.linear_token_logprobs(x, W, a, bias=b, temperature=tau, return_entropy=True,
                                        chunk_size=16)

    def with_reference(x, W, b, a):
        return linear_reference(x, W, a, b, temperature=tau)

    W1, b1 = train(with_gpuce)
    W2, b2 = train(with_reference)
    W0, _ = train(with_reference, steps=0)
    assert (W2 - W0).abs().max() > 1e-3  # the steps moved the policy
    torch.testing.assert_close(W1, W2, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(b1, b2, rtol=1e-12, atol=1e-13)
