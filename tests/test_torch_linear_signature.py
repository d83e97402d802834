"""gpuce.torch.linear_cross_entropy as a drop-in for torch 2.13's
F.linear_cross_entropy: its signature (linear_weight, linear_bias=, weight=, ignore_index=None,
options=), unbatched (D,) input, K-dimensional weights (C, d1, ..., dK, D) with the class axis
second, negative class weights, and nn.LinearCrossEntropyLoss's module; every value and
gradient against torch's own function in float64, with gpuce's options (z-loss with class
weights, statistics) against a reference written here."""

import inspect

import pytest

from helpers import seed_of

torch = pytest.importorskip("torch")
gt = pytest.importorskip("gpuce.torch")
F = torch.nn.functional


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _compare(fn_got, fn_want, leaves, rtol=1e-10, atol=1e-12):
    a, b = _leaves(*leaves), _leaves(*leaves)
    got, want = fn_got(*a), fn_want(*b)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    go = torch.linspace(0.5, 1.5, max(got.numel(), 1), dtype=got.dtype).reshape(got.shape)
    for x, y in zip(torch.autograd.grad(got, a, go), torch.autograd.grad(want, b, go)):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def test_signature_is_torchs():
    mine = inspect.signature(gt.linear_cross_entropy).parameters
    theirs = inspect.signature(F.linear_cross_entropy).parameters
    for name, p in theirs.items():
        assert name in mine, name
        assert mine[name].kind == p.kind and mine[name].default == p.default, name
    assert list(mine)[:len(theirs)] == list(theirs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("out_features", [(), (3,), (2, 3)])
@pytest.mark.parametrize("kind", ["label", "prob"])
def test_k_dimensional_weights_match_torch(reduction, out_features, kind):
    g = torch.Generator().manual_seed(seed_of("kdim", reduction, out_features, kind))
    n, c, d = 5, 4, 6
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn((c,) + out_features + (d,), generator=g, dtype=torch.float64)
    b = torch.randn((c,) + out_features, generator=g, dtype=torch.float64)
    cw = torch.randn(c, generator=g, dtype=torch.float64)  # negative weights included
    if kind == "label":
        t = torch.randint(0, c, (n,) + out_features, generator=g)
        t.view(-1)[::3] = -100
        leaves = (x, w, b)
        kw = dict(weight=cw, label_smoothing=0.1)
    else:
        t = torch.rand((n, c) + out_features, generator=g, dtype=torch.float64).softmax(1)
        leaves = (x, w, b, t)
        kw = dict(weight=cw.abs(), label_smoothing=0.1)

    def run(fn):
        return lambda *v: fn(v[0], v[1], v[3] if len(v) > 3 else t, linear_bias=v[2],
                             reduction=reduction, **kw)

    _compare(run(gt.linear_cross_entropy), run(F.linear_cross_entropy), leaves)


def test_unbatched_and_options():
    g = torch.Generator().manual_seed(seed_of("unbatched"))
    x = torch.randn(6, generator=g, dtype=torch.float64)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    opts = torch.nn.LinearCrossEntropyOptions()
    for t in (torch.tensor(2), torch.rand(4, generator=g, dtype=torch.float64).softmax(0)):
        for red in ("mean", "sum", "none"):
            _compare(lambda a, b: gt.linear_cross_entropy(a, b, t, reduction=red, options=opts),
                     lambda a, b: F.linear_cross_entropy(a, b, t, reduction=red), (x, w))
    with pytest.raises(TypeError, match="options must be None or a torch.nn.LinearCrossEntropyOptions"):
        gt.linear_cross_entropy(x, w, torch.tensor(2), options={"chunk": 4})
    with pytest.raises(ValueError, match="ignore_index cannot be specified"):
        gt.linear_cross_entropy(x, w, torch.rand(4, dtype=torch.float64), ignore_index=-100)
    with pytest.raises(ValueError, match="needs a batched input"):
        gt.linear_cross_entropy(x, torch.randn(4, 2, 6, dtype=torch.float64), torch.tensor(1))


def test_ignore_index_none_means_minus_100():
    g = torch.Generator().manual_seed(seed_of("ignore-none"))
    x, w = torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g)
    t = torch.tensor([0, -100, 3, 1, -100])
    torch.testing.assert_close(gt.linear_cross_entropy(x, w, t),
                               F.cross_entropy(x @ w.T, t), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_k_dimensional_gpuce_options(reduction):
    """z-loss with (negative) class weights, softcap and the statistics with a K-dimensional
    weight, against F.cross_entropy of the materialised logits plus z·lse² over the
    non-ignored positions (mean: over their count)."""
    g = torch.Generator().manual_seed(seed_of("kdim-opts", reduction))
    n, c, d, k = 6, 5, 3, (2,)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn((c,) + k + (d,), generator=g, dtype=torch.float64)
    cw = torch.randn(c, generator=g, dtype=torch.float64)
    t = torch.randint(0, c, (n,) + k, generator=g)
    t[0, 1] = t[3, 0] = -100
    z, cap = 0.02, 3.0

    def want_fn(a, b):
        logits = cap * torch.tanh(torch.einsum("nd,ckd->nck", a, b) / cap)
        ce = F.cross_entropy(logits, t, weight=cw, reduction=reduction)
        zr = torch.where(t != -100, z * torch.logsumexp(logits, 1) ** 2, 0.0)
        if reduction == "none":
            return ce + zr
        return ce + (zr.sum() / (t != -100).sum() if reduction == "mean" else zr.sum())

    def got_fn(a, b):
        loss, st = gt.linear_cross_entropy(a, b, t, weight=cw, reduction=reduction, z_loss=z,
                                           softcap=cap, return_stats=True)
        logits = cap * torch.tanh(torch.einsum("nd,ckd->nck", x, w) / cap)
        torch.testing.assert_close(st.lse.detach(), torch.logsumexp(logits, 1))
        assert st.predicted.shape == (n,) + k
        torch.testing.assert_close(st.predicted, logits.argmax(1), rtol=0, atol=0)
        return loss

    _compare(got_fn, want_fn, (x, w))


def test_module_is_torchs():
    g = torch.Generator().manual_seed(seed_of("module"))
    torch.manual_seed(seed_of("module-init"))
    mine = gt.LinearCrossEntropyLoss(6, 4, out_features=(2,), bias=True, dtype=torch.float64,
                                     weight=torch.rand(4, dtype=torch.float64), reduction="sum")
    ref = torch.nn.LinearCrossEntropyLoss(6, 4, out_features=(2,), bias=True,
                                          dtype=torch.float64, weight=mine.weight,
                                          reduction="sum")
    ref.load_state_dict(mine.state_dict())
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    t = torch.randint(0, 4, (5, 2), generator=g)
    a, b = mine(x, t), ref(x, t)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(mine.linear.weight.grad, ref.linear.weight.grad)
    torch.testing.assert_close(mine.linear.bias.grad, ref.linear.bias.grad)
    with pytest.raises(ValueError, match="weight must have shape"):
        gt.LinearCrossEntropyLoss(6, 4, weight=torch.ones(3))


# --- shift: next-token prediction without copying the hidden states --------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift", [1, 2, True])
def test_shift_is_the_sliced_loss(reduction, shift):
    """shift=s equals torch's loss of x[..., :-s, :] against y[..., s:] (Cut Cross-Entropy's
    definition); "none" keeps the input rows' positions (0 for the last s rows), and the
    gradient of those rows is 0."""
    g = torch.Generator().manual_seed(seed_of("shift", reduction, int(shift)))
    b, t, d, c = 3, 7, 5, 11
    x = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b, t), generator=g)
    y[0, 3] = -100
    s = int(shift)

    def want(x, w, bias):
        loss = F.cross_entropy(F.linear(x[:, :t - s], w, bias).reshape(-1, c),
                               y[:, s:].reshape(-1), reduction=reduction, label_smoothing=0.1)
        if reduction == "none":
            loss = F.pad(loss.reshape(b, t - s), (0, s))
        return loss

    def got(x, w, bias):
        return gt.linear_cross_entropy(x, w, y, linear_bias=bias, reduction=reduction,
                                       label_smoothing=0.1, shift=shift)

    _compare(got, want, [x, w, bias])
    xg = x.clone().requires_grad_()
    got(xg, w, bias).sum().backward()
    assert bool((xg.grad[:, t - s:] == 0).all())
    assert bool((y == y.clone()).all())          # the caller's target is not modified


def test_shift_edge_cases_and_errors():
    g = torch.Generator().manual_seed(seed_of("shift-edge"))
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 3), generator=g)
    y_before = y.clone()
    # a shift as long as the sequence leaves no target: the mean's zero-denominator rule
    loss = gt.linear_cross_entropy(x, w, y, shift=3)
    assert loss.item() == 0.0
    loss.backward()
    assert bool((x.grad == 0).all())
    assert torch.equal(y, y_before)
    base = gt.linear_cross_entropy(x, w, y)
    torch.testing.assert_close(gt.linear_cross_entropy(x, w, y, shift=0), base)
    torch.testing.assert_close(gt.linear_cross_entropy(x, w, y, shift=False), base)
    with pytest.raises(ValueError, match="shift must be >= 0"):
        gt.linear_cross_entropy(x, w, y, shift=-1)
    with pytest.raises(TypeError, match="shift must be an int"):
        gt.linear_cross_entropy(x, w, y, shift=1.0)
    p = torch.softmax(torch.randn(2, 3, 5, generator=g, dtype=torch.float64), -1)
    with pytest.raises(ValueError, match="shift needs class-index targets"):
        gt.linear_cross_entropy(x, w, p, shift=1)
    with pytest.raises(ValueError, match="sequence axis"):
        gt.linear_cross_entropy(x[0, 0], w, y[0, 0], shift=1)
    with pytest.raises(ValueError, match="shift needs"):
        gt.linear_cross_entropy(x[0], torch.randn(5, 2, 4, dtype=torch.float64), y[:, :2], shift=1)
