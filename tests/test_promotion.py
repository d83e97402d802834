"""No result may depend on a dependency's type promotion rules.

Every 16-bit operand (float16, or ml_dtypes' bfloat16) is widened to the accumulation dtype
explicitly before any arithmetic.  If some line of gpuce left the choice to NumPy or
ml_dtypes (a bfloat16 array times a Python float, say), the product would be computed in
16 bits wherever the rules say so, and the results would move by about 2^-8 relative.  Here
every public function gets every 16-bit combination of inputs (logits, probability targets
and class weights in float16, bfloat16 and float32, mixed) and must agree with float64 of the
same values to float32's accuracy (the losses, which are float32) or to one rounding (16-bit
outputs), which a 16-bit intermediate cannot meet.
"""

import itertools

import numpy as np
import pytest

import gpuce
import reference as R
from helpers import BFLOAT16, rng_for, to_numpy

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
HALVES = [F16, BFLOAT16]
# the unit roundoff of one rounding to nearest: 2^-p for p significant bits
UNIT = {F16: 2.0**-11, BFLOAT16: 2.0**-8}
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6  # float32 accumulation of exactly-held 16-bit values


def up(a):
    return np.asarray(to_numpy(a)).astype(np.float64)


def assert_rounded_once(got, ref, dtype):
    """Each 16-bit element within one rounding of the float64 value (plus float32's own
    error, scaled to the largest element)."""
    got, ref = up(got), np.asarray(ref, np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 1.0
    bound = UNIT[dtype] * np.abs(ref) * (1 + 1e-3) + 1e-6 * max(scale, 1.0)
    err = np.abs(got - ref)
    bad = ~(err <= bound)
    assert not bad.any(), (f"{int(bad.sum())} of {bad.size} elements beyond one {dtype} rounding; "
                           f"worst {float(np.max(err / np.maximum(np.abs(ref), 1e-30)))}")


def inputs(rng, n, c, logit_dtype, target_dtype, kind):
    x = (rng.standard_normal((n, c)) * 3).astype(logit_dtype)
    if kind == "label":
        t = rng.integers(0, c, n)
        t[rng.random(n) < 0.2] = -100
    else:
        p = rng.random((n, c))
        t = (p / p.sum(1, keepdims=True)).astype(target_dtype)
    return x, t


CASES = list(itertools.product(
    HALVES, ["label", F16, BFLOAT16, F32],
    [dict(label_smoothing=0.1), dict(weight=True), dict(softcap=5.0), dict(z_loss=1e-3),
     dict(label_smoothing=0.3, weight=True, softcap=4.0, z_loss=1e-4)],
    ["none", "mean"]))


@pytest.mark.parametrize("logit_dtype,target,opts,reduction", CASES)
def test_softmax_cross_entropy(xp, logit_dtype, target, opts, reduction):
    rng = rng_for("sce", logit_dtype.name, str(target), sorted(opts), reduction)
    kind = "label" if target == "label" else "prob"
    n, c = 13, 37
    x, t = inputs(rng, n, c, logit_dtype, target if kind == "prob" else None, kind)
    opts = dict(opts)
    w = None
    if opts.pop("weight", False):
        # float16 weights with bfloat16 logits and the other way round: mixed on purpose
        w = (rng.random(c) * 2 + 0.1).astype(F16 if logit_dtype == BFLOAT16 else BFLOAT16)
        opts["weight"] = xp.asarray(w)
    loss, grad = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), reduction=reduction,
                                             return_grad=True, **opts)
    ref_opts = {k: v for k, v in opts.items() if k != "weight"}
    ref_loss, ref_grad = R.sce(up(x), t if kind == "label" else up(t), kind=kind,
                               weight=None if w is None else up(w), reduction=reduction,
                               **ref_opts)
    assert loss.dtype == F32 and grad.dtype == logit_dtype
    np.testing.assert_allclose(up(loss), ref_loss, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert_rounded_once(grad, ref_grad, logit_dtype)


@pytest.mark.parametrize("dtype,kind,target_dtype", [
    (F16, "label", None), (BFLOAT16, "label", None), (F16, "prob", BFLOAT16),
    (BFLOAT16, "prob", F16), (BFLOAT16, "prob", F32)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy(xp, dtype, kind, target_dtype, reduction):
    """X and W hold small multiples of powers of two, so that every logit X Wᵀ (+ b) is exact
    in 16 bits: the float64 reference then sees the very logits gpuce rounds to."""
    rng = rng_for("linear", dtype.name, kind, str(target_dtype), reduction)
    n, d, c = 11, 4, 9
    X = rng.integers(-2, 3, (n, d)) / 2.0
    W = rng.integers(-8, 9, (c, d)) / 8.0
    b = rng.integers(-4, 5, c) / 4.0
    if kind == "label":
        y = rng.integers(0, c, n)
        y[0] = -100
    else:
        p = rng.random((n, c))
        y = (p / p.sum(1, keepdims=True)).astype(target_dtype)
    weight = (rng.random(c) + 0.5).astype(F32)
    opts = dict(label_smoothing=0.2, z_loss=1e-3, weight=xp.asarray(weight), reduction=reduction)
    loss, grads = gpuce.linear_cross_entropy(
        xp.asarray(X.astype(dtype)), xp.asarray(W.astype(dtype)), xp.asarray(y),
        bias=xp.asarray(b.astype(dtype)), return_grad=True, chunk_size=4, **opts)
    f = X @ W.T + b
    ref_loss, G = R.sce(f, y if kind == "label" else up(y), kind=kind, weight=weight.astype(np.float64),
                        label_smoothing=0.2, z_loss=1e-3, reduction=reduction)
    assert loss.dtype == F32
    np.testing.assert_allclose(up(loss), ref_loss, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    # G is rounded to 16 bits once (the GEMMs' operand, as torch's): the products within a
    # few roundings of the exact ones
    G16 = up(G.astype(dtype))
    # the bias gradient sums the float32 G before its one rounding
    for got, ref in ((grads.X, G16 @ W), (grads.W, G16.T @ X), (grads.bias, G.sum(0))):
        assert got.dtype == dtype
        np.testing.assert_allclose(up(got), ref, rtol=4 * UNIT[dtype],
                                   atol=1e-6 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_softmax_family(xp, dtype, name):
    rng = rng_for("softmax", dtype.name, name)
    x = (rng.standard_normal((7, 29)) * 4).astype(dtype)
    got = getattr(gpuce, name)(xp.asarray(x), axis=-1)
    x64 = up(x)
    lse = np.array([R.lse_row(r) for r in x64])
    ref = {"softmax": np.exp(x64 - lse[:, None]), "log_softmax": x64 - lse[:, None],
           "logsumexp": lse}[name]
    assert got.dtype == dtype
    assert_rounded_once(got, ref, dtype)


@pytest.mark.parametrize("pd,qd", [(F16, BFLOAT16), (BFLOAT16, F16), (BFLOAT16, BFLOAT16),
                                   (F16, F32), (BFLOAT16, F32)])
def test_information(xp, pd, qd):
    rng = rng_for("info", pd.name, qd.name)
    p = rng.random((5, 17))
    q = rng.random((5, 17))
    p, q = (p / p.sum(1, keepdims=True)).astype(pd), (q / q.sum(1, keepdims=True)).astype(qd)
    p64, q64 = up(p), up(q)
    refs = {"entropy": -(p64 * np.log(p64)).sum(1),
            "cross_entropy": -(p64 * np.log(q64)).sum(1),
            "kl_div": (p64 * np.log(p64 / q64)).sum(1)}
    for name, ref in refs.items():
        args = (xp.asarray(p),) if name == "entropy" else (xp.asarray(p), xp.asarray(q))
        got = getattr(gpuce, name)(*args)
        assert got.dtype == F32, name
        np.testing.assert_allclose(up(got), ref, rtol=LOSS_RTOL, atol=LOSS_ATOL, err_msg=name)
