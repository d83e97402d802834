"""z-loss with class weights under reduction="mean": the cross-entropy part is divided by the
weight sum of the non-ignored labels, the z-loss part z·Σ lse_i² by the number of non-ignored
rows, unweighted (Liger-Kernel's definition), on every path: the contiguous call, the block
walk, the chunked linear model, dask (softmax cross-entropy and linear) and gpuce.torch.
The reference is float64 written here: torch's own F.cross_entropy for the weighted part plus
the z term, differentiated by torch's autograd."""

import numpy as np
import pytest

import gpuce
from helpers import rng_for, to_numpy

torch = pytest.importorskip("torch")
F = torch.nn.functional

N, C, D = 23, 7, 5
Z = 0.05


def _inputs(seed, negative=False):
    rng = rng_for("zw", seed)
    x = rng.standard_normal((N, C)) * 3
    t = rng.integers(0, C, N)
    t[rng.random(N) < 0.25] = -100
    w = rng.random(C) * 2 + 0.25
    if negative:
        w[1] = -0.7
    return x, t, w


def _reference(logits, t, w, eps):
    """Loss and gradient (w.r.t. the logits tensor's leaves) of the float64 reference."""
    tt = torch.as_tensor(t)
    ce = F.cross_entropy(logits, tt, weight=torch.as_tensor(w), label_smoothing=eps)
    lse = torch.logsumexp(logits, -1)
    keep = tt != -100
    return ce + Z * (lse[keep] ** 2).sum() / keep.sum()


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("negative", [False, True])
def test_softmax_cross_entropy(xp, eps, negative):
    x, t, w = _inputs("sce", negative)
    xt = torch.tensor(x, requires_grad=True)
    want = _reference(xt, t, w, eps)
    (want_g,) = torch.autograd.grad(want, xt)
    loss, grad, st = gpuce.softmax_cross_entropy(
        xp.asarray(x), xp.asarray(t), weight=xp.asarray(w), z_loss=Z, label_smoothing=eps,
        return_grad=True, return_stats=True)
    np.testing.assert_allclose(float(to_numpy(loss)), want.item(), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(grad), want_g.numpy(), rtol=1e-10, atol=1e-14)
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    keep = t != -100
    np.testing.assert_allclose(float(to_numpy(st.z_loss)), Z * (lse[keep] ** 2).mean(), rtol=1e-12)
    # the walked path (logits without an (N, C) view) agrees with the contiguous one
    xw = x[:20].reshape(4, 5, C).transpose(1, 0, 2)  # (5, 4, C): its rows do not merge
    tw = np.ascontiguousarray(t[:20].reshape(4, 5).T)
    runs = [gpuce.softmax_cross_entropy(xp.asarray(v) if v is xw else xp.asarray(v), xp.asarray(tw),
                                        weight=xp.asarray(w), z_loss=Z, label_smoothing=eps,
                                        return_grad=True)
            for v in (xw, np.ascontiguousarray(xw))]
    np.testing.assert_allclose(float(to_numpy(runs[0][0])), float(to_numpy(runs[1][0])), rtol=1e-14)
    np.testing.assert_allclose(to_numpy(runs[0][1]), to_numpy(runs[1][1]), rtol=1e-13, atol=1e-16)


def test_sum_and_none_unchanged(xp):
    """Only the mean changes: per row and summed, z·lse_i² is added unweighted as before."""
    x, t, w = _inputs("none")
    xt = torch.tensor(x)
    tt = torch.as_tensor(t)
    lse = torch.logsumexp(xt, -1)
    rows = F.cross_entropy(xt, tt, weight=torch.as_tensor(w), reduction="none") + \
        torch.where(tt != -100, Z * lse ** 2, 0.0)
    got = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), weight=xp.asarray(w), z_loss=Z,
                                      reduction="none")
    np.testing.assert_allclose(to_numpy(got), rows.numpy(), rtol=1e-12)
    got = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), weight=xp.asarray(w), z_loss=Z,
                                      reduction="sum")
    np.testing.assert_allclose(float(to_numpy(got)), float(rows.sum()), rtol=1e-12)


@pytest.mark.parametrize("chunk", [None, 4])
def test_linear_cross_entropy(xp, chunk):
    rng = rng_for("zw-linear")
    _, t, w = _inputs("linear")
    X, W, b = rng.standard_normal((N, D)), rng.standard_normal((C, D)), rng.standard_normal(C)
    Xt, Wt, bt = (torch.tensor(v, requires_grad=True) for v in (X, W, b))
    want = _reference(Xt @ Wt.T + bt, t, w, 0.1)
    want_g = torch.autograd.grad(want, (Xt, Wt, bt))
    loss, g = gpuce.linear_cross_entropy(xp.asarray(X), xp.asarray(W), xp.asarray(t),
                                         bias=xp.asarray(b), weight=xp.asarray(w), z_loss=Z,
                                         label_smoothing=0.1, chunk_size=chunk, return_grad=True)
    np.testing.assert_allclose(float(to_numpy(loss)), want.item(), rtol=1e-12)
    for got, ref in zip((g.X, g.W, g.bias), want_g):
        np.testing.assert_allclose(to_numpy(got), ref.numpy(), rtol=1e-10, atol=1e-13)


def test_dask_paths():
    """The dask forms find the whole call's denominator and row count before the blocks."""
    da = pytest.importorskip("dask.array")
    x, t, w = _inputs("dask")
    xt = torch.tensor(x, requires_grad=True)
    want = _reference(xt, t, w, 0.0)
    (want_g,) = torch.autograd.grad(want, xt)
    loss, grad = gpuce.softmax_cross_entropy(da.from_array(x, chunks=(6, C)),
                                             da.from_array(t, chunks=6), weight=w, z_loss=Z,
                                             return_grad=True)
    np.testing.assert_allclose(float(loss.compute()), want.item(), rtol=1e-12)
    np.testing.assert_allclose(grad.compute(), want_g.numpy(), rtol=1e-10, atol=1e-14)
    rng = rng_for("zw-dask-linear")
    X, W = rng.standard_normal((N, D)), rng.standard_normal((C, D))
    Xt, Wt = (torch.tensor(v, requires_grad=True) for v in (X, W))
    want = _reference(Xt @ Wt.T, t, w, 0.0)
    want_g = torch.autograd.grad(want, (Xt, Wt))
    loss, g = gpuce.linear_cross_entropy(da.from_array(X, chunks=(5, D)), W,
                                         da.from_array(t, chunks=5), weight=w, z_loss=Z,
                                         return_grad=True)
    np.testing.assert_allclose(float(loss.compute()), want.item(), rtol=1e-12)
    np.testing.assert_allclose(g.X.compute(), want_g[0].numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(np.asarray(g.W.compute() if hasattr(g.W, "compute") else g.W),
                               want_g[1].numpy(), rtol=1e-10, atol=1e-13)


def test_torch():
    gt = pytest.importorskip("gpuce.torch")
    x, t, w = _inputs("torch", negative=True)
    xa, xb = (torch.tensor(x, requires_grad=True) for _ in range(2))
    want = _reference(xa, t, w, 0.1)
    got = gt.cross_entropy(xb, torch.as_tensor(t), weight=torch.as_tensor(w), z_loss=Z,
                           label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, xb)[0], torch.autograd.grad(want, xa)[0],
                               rtol=1e-10, atol=1e-14)
    rng = rng_for("zw-torch-linear")
    X, W = rng.standard_normal((N, D)), rng.standard_normal((C, D))
    Xa, Wa, Xb, Wb = (torch.tensor(v, requires_grad=True) for v in (X, W, X, W))
    want = _reference(Xa @ Wa.T, t, w, 0.0)
    got = gt.linear_cross_entropy(Xb, Wb, torch.as_tensor(t), weight=torch.as_tensor(w), z_loss=Z,
                                  chunk_size=6)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(got, (Xb, Wb)), torch.autograd.grad(want, (Xa, Wa))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
