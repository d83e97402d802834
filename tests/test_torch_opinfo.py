"""torch's own OpInfo samples, run through gpuce.torch and compared with torch.

Every sample that torch's test suite draws for ``nn.functional.linear_cross_entropy`` (its three
variants: plain, "chunked" with ``options=``, "chunked_none") and for
``nn.functional.cross_entropy``, in float32 and float64: the loss and every gradient torch
computes (input, linear_weight, linear_bias, and a probability target / class weight where the
sample makes them require grad).  torch's testing module needs the ``expecttest`` package.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")
F = torch.nn.functional

from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

import gpuce.torch as gt  # noqa: E402

DTYPES = [torch.float32, torch.float64]


def _ops(name):
    return [op for op in op_db if op.name == name]


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone().requires_grad_(v.requires_grad)
    return v


def _run(fn, args, kwargs):
    """fn(*args, **kwargs); the loss and the gradients of Σ g·loss (g fixed) for every tensor
    argument that requires grad, in argument order."""
    args = [_clone(a) for a in args]
    kwargs = {k: _clone(v) for k, v in kwargs.items()}
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    leaves += [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    loss = fn(*args, **kwargs)
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad(loss, leaves, g, allow_unused=True) if leaves else ()
    return loss.detach(), grads, len(leaves)


def _check(torch_fn, gpuce_fn, sample, dtype):
    args = [sample.input, *sample.args]
    kwargs = dict(sample.kwargs)
    want_loss, want_grads, n = _run(torch_fn, args, kwargs)
    got_loss, got_grads, _ = _run(gpuce_fn, args, kwargs)
    assert got_loss.dtype == want_loss.dtype and got_loss.shape == want_loss.shape
    torch.testing.assert_close(got_loss, want_loss, **_tol(dtype), equal_nan=True)
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        if b is not None:
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, **_tol(dtype), equal_nan=True)
    return n


def test_the_op_db_has_what_this_file_covers():
    assert sorted(op.variant_test_name for op in _ops("nn.functional.linear_cross_entropy")) == \
        ["", "chunked", "chunked_none"]
    assert len(_ops("nn.functional.cross_entropy")) == 1


# torch's own chunked path warns where it ignores its options (class-probability targets,
# K-dimensional weights); the warning is torch's, not gpuce's
@pytest.mark.filterwarnings("ignore:linear_cross_entropy. ..options.. ignored:UserWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["", "chunked", "chunked_none"])
def test_linear_cross_entropy_samples(variant, dtype):
    (op,) = [o for o in _ops("nn.functional.linear_cross_entropy")
             if o.variant_test_name == variant]
    torch.manual_seed(1234)
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    assert len(samples) > 50
    kinds = {"k_dim": 0, "unbatched": 0, "bias": 0, "weight": 0, "negative_weight": 0,
             "prob": 0}
    for s in samples:
        w = s.args[0]
        kinds["k_dim"] += w.dim() > 2
        kinds["unbatched"] += s.input.dim() == 1
        kinds["bias"] += s.kwargs.get("linear_bias") is not None
        cw = s.kwargs.get("weight")
        kinds["weight"] += cw is not None
        kinds["negative_weight"] += cw is not None and bool((cw < 0).any())
        kinds["prob"] += s.args[1].is_floating_point()
        _check(F.linear_cross_entropy, gt.linear_cross_entropy, s, dtype)
    # the samples exercise what the signature is about (the counts depend on torch's draws,
    # so only their presence is asserted)
    assert kinds["k_dim"] and kinds["unbatched"] and kinds["weight"], kinds


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_samples(dtype):
    (op,) = _ops("nn.functional.cross_entropy")
    torch.manual_seed(4321)
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    n_target_grads = n_negative = 0
    for s in samples:
        n_target_grads += _check(F.cross_entropy, gt.cross_entropy, s, dtype) >= 2
        w = s.kwargs.get("weight")
        n_negative += w is not None and bool((w < 0).any())
    assert len(samples) == 21
    assert n_target_grads == 10   # the probability targets require grad too
    assert n_negative >= 1        # torch draws class weights in [-9, 9)
