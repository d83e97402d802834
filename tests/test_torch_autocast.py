"""gpuce.torch under torch.autocast behaves as torch's own ops do there.

torch's autocast runs ``F.cross_entropy`` in float32 (its inputs cast up, a float32 loss) and
``F.linear`` in the autocast dtype (inputs cast down).  So under autocast
``gpuce.torch.cross_entropy`` gives a float32 loss from float32 logits, and
``gpuce.torch.linear_cross_entropy`` takes a bfloat16 input with a float32 ``nn.Linear``
(16-bit inputs, float32 logits and a float32 loss: more accurate than torch's own 16-bit
logits), with gradients reaching each leaf in the leaf's dtype.
"""

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import gpuce.torch as gt  # noqa: E402
from helpers import torch_devices  # noqa: E402


def _autocast_dtypes(device):
    return [torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


@pytest.mark.parametrize("device", torch_devices(torch))
@pytest.mark.parametrize("kind", ["label", "prob"])
def test_cross_entropy_runs_in_float32_as_torch(device, kind):
    for dtype in _autocast_dtypes(device):
        g = torch.Generator().manual_seed(3)
        x = (torch.randn(16, 11, generator=g) * 3).to(dtype).to(device)
        if kind == "label":
            t = torch.randint(0, 11, (16,), generator=g).to(device)
        else:
            t = torch.softmax(torch.randn(16, 11, generator=g), 1).to(dtype).to(device)
        w = (torch.rand(11, generator=g) + 0.5).to(device)
        results = []
        for fn in (F.cross_entropy, gt.cross_entropy):
            xi = x.clone().requires_grad_(True)
            with torch.autocast(device, dtype=dtype):
                loss = fn(xi, t, weight=w, label_smoothing=0.1)
            loss.backward()
            results.append((loss, xi.grad))
        (want, want_g), (got, got_g) = results
        assert want.dtype == torch.float32 and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert got_g.dtype == want_g.dtype == dtype
        torch.testing.assert_close(got_g.float(), want_g.float(), rtol=2.0**-7, atol=1e-5)


@pytest.mark.parametrize("device", torch_devices(torch))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_with_a_float32_head(device, reduction):
    """The issue's reproducer: a bfloat16 hidden state, a float32 nn.Linear, under autocast."""
    for dtype in _autocast_dtypes(device):
        torch.manual_seed(0)
        head = torch.nn.Linear(32, 50).to(device)
        h0 = torch.randn(24, 32, device=device).to(dtype)
        y = torch.randint(0, 50, (24,), device=device)
        y[::5] = -100
        results = []
        for use_gpuce in (False, True):
            head.zero_grad()
            h = h0.clone().requires_grad_(True)
            with torch.autocast(device, dtype=dtype):
                if use_gpuce:
                    loss = gt.linear_cross_entropy(h, head.weight, y, linear_bias=head.bias, reduction=reduction)
                else:
                    loss = F.cross_entropy(F.linear(h, head.weight, head.bias), y,
                                           reduction=reduction)
            loss.sum().backward()
            results.append((loss.detach(), h.grad, head.weight.grad.clone(), head.bias.grad.clone()))
        want, got = results
        assert got[0].dtype == want[0].dtype == torch.float32
        assert got[1].dtype == want[1].dtype == dtype
        assert got[2].dtype == want[2].dtype == torch.float32  # the float32 leaf
        # float64 of the same values: the inputs as autocast casts them (16-bit), the logits,
        # the loss and its gradients in float64
        h64, w64, b64 = (v.detach().to(dtype).double().requires_grad_()
                         for v in (h0, head.weight, head.bias))
        ref = F.cross_entropy(F.linear(h64, w64, b64), y, reduction=reduction)
        ref_g = torch.autograd.grad(ref.sum(), (h64, w64, b64))
        # gpuce keeps the logits in float32 (torch rounds them to 16 bits first): its loss is
        # float32-accurate, and never further from float64 than torch's
        err_g, err_t = ((v.double() - ref).abs().max() for v in (got[0], want[0]))
        assert err_g <= 1e-5 * max(1.0, float(ref.abs().max()))
        assert err_g <= err_t + 1e-6
        # the gradients: G rounded to 16 bits once for the GEMMs, as torch rounds its own
        for a, b, r in zip(got[1:], want[1:], ref_g):
            scale = float(r.abs().max())
            torch.testing.assert_close(a.double(), r, rtol=2.0**-6, atol=2.0**-7 * scale)
            assert (a.double() - r).abs().max() <= 2 * (b.double() - r).abs().max() + 1e-6 * scale


def test_no_autocast_keeps_the_input_dtype():
    x = torch.randn(4, 5).to(torch.bfloat16)
    y = torch.tensor([0, 1, 2, 3])
    assert gt.cross_entropy(x, y).dtype == torch.bfloat16
    w = torch.randn(5, 3).to(torch.bfloat16)
    assert gt.linear_cross_entropy(torch.randn(4, 3).to(torch.bfloat16), w, y).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="same dtype"):  # outside autocast a mix is an error
        gt.linear_cross_entropy(torch.randn(4, 3).to(torch.bfloat16), w.float(), y)


def test_autocast_under_compile():
    x = torch.randn(8, 6)
    y = torch.randint(0, 6, (8,))
    w = torch.randn(6, 6)

    def step(x, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return gt.linear_cross_entropy(x, w, y)

    eager = step(x, w)
    compiled = torch.compile(step, fullgraph=True)(x, w)
    assert compiled.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(compiled, eager)
