"""gpuce.torch's per-row lse (``return_stats=True``) is differentiable: ∂lse_i/∂f_ij = q_ij
(chained through the softcap), so that ``loss + z * (lse ** 2).mean()`` trains as Cut
Cross-Entropy's users write it.  Checked against float64 autograd of the materialised
reference (F.cross_entropy and torch.logsumexp of the same logits) for cross_entropy and
linear_cross_entropy, every reduction, with and without a softcap, through torch.compile, and
with only the lse differentiated."""

import pytest

from helpers import seed_of

torch = pytest.importorskip("torch")
gt = pytest.importorskip("gpuce.torch")
F = torch.nn.functional


def _capped(f, softcap):
    return softcap * torch.tanh(f / softcap) if softcap else f


def _labels(g, n, c):
    t = torch.randint(0, c, (n,), generator=g)
    t[::4] = -100
    return t


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_loss", [True, False])
def test_cross_entropy(reduction, softcap, use_loss):
    g = torch.Generator().manual_seed(seed_of("lse-ce", reduction, softcap))
    x = (torch.randn(9, 6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = _labels(g, 9, 6)
    xr = x.detach().clone().requires_grad_()
    loss, st = gt.cross_entropy(x, t, reduction=reduction, softcap=softcap, z_loss=1e-3,
                                return_stats=True)
    assert st.lse.requires_grad and not st.z_loss.requires_grad
    cap = _capped(xr, softcap)
    extra_w = torch.linspace(0.2, 1.4, 9, dtype=torch.float64)
    got = (loss.sum() if use_loss else 0) + (extra_w * st.lse ** 2).sum()
    want = (F.cross_entropy(cap, t, reduction=reduction).sum() + _z_part(cap, t, reduction)
            if use_loss else 0) + (extra_w * torch.logsumexp(cap, -1) ** 2).sum()
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad(got, x)
    (gw,) = torch.autograd.grad(want, xr)
    torch.testing.assert_close(gx, gw, rtol=1e-10, atol=1e-13)


def _z_part(cap, t, reduction):
    """z·lse² over the non-ignored rows (z = 1e-3), reduced as gpuce reduces it."""
    z = torch.where(t != -100, 1e-3 * torch.logsumexp(cap, -1) ** 2, 0.0)
    return z.sum() / (t != -100).sum() if reduction == "mean" else z.sum()


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_loss", [True, False])
def test_linear_cross_entropy(reduction, softcap, use_loss):
    g = torch.Generator().manual_seed(seed_of("lse-lce", reduction, softcap))
    X, W, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((11, 4), (7, 4), (7,)))
    t = _labels(g, 11, 7)
    leaves = [v.requires_grad_() for v in (X, W, b)]
    refs = [v.detach().clone().requires_grad_() for v in (X, W, b)]
    loss, st = gt.linear_cross_entropy(X, W, t, linear_bias=b, reduction=reduction,
                                       softcap=softcap, return_stats=True, chunk_size=4)
    cap = _capped(refs[0] @ refs[1].T + refs[2], softcap)
    got = (loss.sum() if use_loss else 0) + 0.25 * (st.lse ** 2).mean()
    want = (F.cross_entropy(cap, t, reduction=reduction).sum() if use_loss else 0) \
        + 0.25 * (torch.logsumexp(cap, -1) ** 2).mean()
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-12, atol=1e-12)
    for a, r in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, refs)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-13)


def test_compiled_lse_recipe():
    """CCE's recipe ``loss + z * (lse ** 2).mean()`` under torch.compile(fullgraph=True)."""
    g = torch.Generator().manual_seed(seed_of("lse-compile"))
    X, W = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((10, 4), (6, 4)))
    t = _labels(g, 10, 6)

    def step(a, w):
        loss, st = gt.linear_cross_entropy(a, w, t, return_stats=True)
        return loss + 1e-2 * (st.lse ** 2).mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a1, w1 = X.clone().requires_grad_(), W.clone().requires_grad_()
    a2, w2 = X.clone().requires_grad_(), W.clone().requires_grad_()
    got = compiled(a1, w1)
    lg = a2 @ w2.T
    want = F.cross_entropy(lg, t) + 1e-2 * (torch.logsumexp(lg, -1) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for a, r in zip(torch.autograd.grad(got, (a1, w1)), torch.autograd.grad(want, (a2, w2))):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-13)


def test_bfloat16_lse_gradient_rounded_once():
    """16-bit logits: the lse gradient is formed in float32 and rounded once to bfloat16."""
    g = torch.Generator().manual_seed(seed_of("lse-bf16"))
    x = (torch.randn(8, 50, generator=g) * 4).to(torch.bfloat16).requires_grad_()
    t = _labels(g, 8, 50)
    _, st = gt.cross_entropy(x, t, return_stats=True)
    (gx,) = torch.autograd.grad(st.lse.sum(), x)
    assert gx.dtype == torch.bfloat16
    want = torch.softmax(x.detach().double(), -1).to(torch.bfloat16)
    torch.testing.assert_close(gx, want, rtol=0, atol=0)
