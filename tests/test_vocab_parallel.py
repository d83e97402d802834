"""Vocabulary-parallel cross-entropy and token log-probabilities over torch.distributed (gloo, spawned CPU processes, world
sizes 1 to 4, uneven class blocks such as 507 classes over 4 ranks): every option against the
unsharded gpuce.torch call, the loss's bits equal on every rank, the gradient blocks
concatenated equal the unsharded gradient, and the collectives counted (one all-gather in the
forward; none in the cross-entropy backward, one all-reduce of dX in the linear head's).
The array-level decomposition (gpuce._vocab) is tested without processes too."""

import os
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

import gpuce.torch as gt  # noqa: E402
import vocab_worker as W  # noqa: E402
from gpuce import _vocab as V  # noqa: E402
from gpuce._validation import ShapeOnly, sce_args  # noqa: E402

N, D = 17, 6
LAYOUTS = {1: [507], 2: [300, 207], 3: [1, 250, 256], 4: [127, 127, 127, 126]}


def _spawn_target(rank, world, sizes, init, out):
    W.run(rank, world, sizes, N, D, init, out)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def ranks(request):
    world = request.param
    sizes = LAYOUTS[world]
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "store")
        mp.spawn(_spawn_target, args=(world, sizes, init, tmp), nprocs=world, join=True)
        yield world, sizes, [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
                             for r in range(world)]


def unsharded(name, kind, dtype, opts, logits, labels, probs, weight):
    opts = dict(opts)
    wt = weight.to(getattr(torch, dtype)) if opts.pop("weight", False) else None
    x = logits.to(getattr(torch, dtype)).clone().requires_grad_(True)
    tgt = labels if kind == "label" else probs.to(getattr(torch, dtype))
    out = gt.cross_entropy(x, tgt, weight=wt, **opts)
    loss, st = out if opts.get("return_stats") else (out, None)
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    loss.backward(g)
    return loss.detach().double().numpy(), x.grad.double().numpy(), st


def bound(dtype):
    return {"float64": (1e-12, 1e-13), "float32": (2e-6, 1e-7), "bfloat16": (2.0**-7, 1e-6)}[dtype]


@pytest.mark.parametrize("case", W.CASES, ids=[c[0] for c in W.CASES])
def test_cross_entropy_equals_unsharded(ranks, case):
    world, sizes, res = ranks
    name, kind, dtype, opts = case
    logits, labels, probs, weight, *_ = W.problem(N, sum(sizes), D)
    want_loss, want_grad, want_st = unsharded(name, kind, dtype, opts, logits, labels, probs,
                                              weight)
    rtol, atol = bound(dtype)
    for r in range(world):
        got = res[r][name]
        np.testing.assert_allclose(got["loss"], want_loss, rtol=rtol, atol=atol)
        assert got["loss_bits"] == res[0][name]["loss_bits"]  # the same bits on every rank
        assert got["fwd"] == ["all_gather"] and got["bwd"] == []
    grad = np.concatenate([res[r][name]["grad"] for r in range(world)], axis=1)
    np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=atol)
    if want_st is not None:
        got_st = res[0][name]["stats"]
        for got_v, want_v in zip(got_st, want_st):
            if want_v is None:
                assert got_v is None
            else:
                np.testing.assert_allclose(got_v, want_v.detach().double().numpy(), rtol=rtol, atol=atol,
                                           equal_nan=True)


@pytest.mark.parametrize("case", W.LINEAR_CASES, ids=[c[0] for c in W.LINEAR_CASES])
def test_linear_head_equals_unsharded(ranks, case):
    world, sizes, res = ranks
    name, dtype, opts = case
    _, labels, _, weight, x, w, b = W.problem(N, sum(sizes), D)
    opts = dict(opts)
    dt = getattr(torch, dtype)
    wt = weight.to(dt) if opts.pop("weight", False) else None
    xs, ws, bs = (v.to(dt).clone().requires_grad_(True) for v in (x, w, b))
    out = gt.linear_cross_entropy(xs, ws, labels, linear_bias=bs, weight=wt, **opts)
    loss, st = out if opts.get("return_stats") else (out, None)
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    loss.backward(g)
    rtol, atol = bound(dtype)
    for r in range(world):
        got = res[r][name]
        np.testing.assert_allclose(got["loss"], loss.detach().double().numpy(), rtol=rtol,
                                   atol=atol)
        assert got["loss_bits"] == res[0][name]["loss_bits"]
        assert got["fwd"] == ["all_gather"] and got["bwd"] == ["all_reduce"]
        np.testing.assert_allclose(got["dx"], xs.grad.double().numpy(), rtol=rtol,
                                   atol=atol * 10)
    dw = np.concatenate([res[r][name]["dw"] for r in range(world)])
    db = np.concatenate([res[r][name]["db"] for r in range(world)])
    np.testing.assert_allclose(dw, ws.grad.double().numpy(), rtol=rtol, atol=atol * 10)
    np.testing.assert_allclose(db, bs.grad.double().numpy(), rtol=rtol, atol=atol * 10)
    if st is not None:
        for got_v, want_v in zip(res[0][name]["stats"], st):
            if want_v is not None:
                np.testing.assert_allclose(got_v, want_v.detach().double().numpy(), rtol=rtol, atol=atol)


def _check_token_outputs(res, name, dtype, logp, ent, bwd):
    """Every rank's log p and H equal the unsharded ones (float32 outputs for bfloat16 inputs:
    float32's bound) with the same bits on every rank; one all-gather forward, ``bwd`` after."""
    rtol, atol = bound("float32" if dtype == "bfloat16" else dtype)
    for got in (r[name] for r in res):
        np.testing.assert_allclose(got["logp"], logp.detach().double().numpy(), rtol=rtol, atol=atol)
        if ent is not None:
            np.testing.assert_allclose(got["ent"], ent.detach().double().numpy(), rtol=rtol, atol=atol)
        assert got["logp_bits"] == res[0][name]["logp_bits"]
        assert got["fwd"] == ["all_gather"] and got["bwd"] == bwd


@pytest.mark.parametrize("case", W.TOKEN_CASES, ids=[c[0] for c in W.TOKEN_CASES])
def test_token_logprobs_equal_unsharded(ranks, case):
    """log p and H on every rank equal the unsharded call's (the same bits on every rank),
    the gradient blocks concatenated equal its gradient; one all-gather forward, nothing
    backward.  The rows include a −inf logit and an ignored token."""
    world, sizes, res = ranks
    name, dtype, opts = case
    logits, labels, *_ = W.problem(N, sum(sizes), D)
    x = logits.to(getattr(torch, dtype)).clone().requires_grad_(True)
    out = gt.token_logprobs(x, labels, **opts)
    logp, ent = out if opts.get("return_entropy") else (out, None)
    W.token_objective(logp, ent).backward()
    _check_token_outputs(res, name, dtype, logp, ent, bwd=[])
    grad = np.concatenate([res[r][name]["grad"] for r in range(world)], axis=1)
    grtol, gatol = bound(dtype)
    np.testing.assert_allclose(grad, x.grad.double().numpy(), rtol=grtol, atol=gatol * 10)


@pytest.mark.parametrize("case", W.LINEAR_TOKEN_CASES, ids=[c[0] for c in W.LINEAR_TOKEN_CASES])
def test_linear_token_logprobs_equal_unsharded(ranks, case):
    """The column-parallel head: log p and H on every rank equal the unsharded call's (the same
    bits everywhere); dX on every rank, dW and db blocks concatenated, equal its gradients; one
    all-gather forward, one all-reduce (dX) backward."""
    world, sizes, res = ranks
    name, dtype, opts = case
    _, labels, _, _, x, w, b = W.problem(N, sum(sizes), D)
    dt = getattr(torch, dtype)
    xs, ws, bs = (v.to(dt).clone().requires_grad_(True) for v in (x, w, b))
    out = gt.linear_token_logprobs(xs, ws, labels, bias=bs, **opts)
    logp, ent = out if opts.get("return_entropy") else (out, None)
    W.token_objective(logp, ent).backward()
    _check_token_outputs(res, name, dtype, logp, ent, bwd=["all_reduce"])
    grtol, gatol = bound(dtype)
    for r in range(world):
        np.testing.assert_allclose(res[r][name]["dx"], xs.grad.double().numpy(), rtol=grtol,
                                   atol=gatol * 10)
    dw = np.concatenate([res[r][name]["dw"] for r in range(world)])
    db = np.concatenate([res[r][name]["db"] for r in range(world)])
    np.testing.assert_allclose(dw, ws.grad.double().numpy(), rtol=grtol, atol=gatol * 10)
    np.testing.assert_allclose(db, bs.grad.double().numpy(), rtol=grtol, atol=gatol * 10)


def test_bad_label_raises_before_the_collective(ranks):
    world, sizes, res = ranks
    for r in range(world):
        msg, calls = res[r]["bad_label"]
        assert "label" in msg and "position (4,)" in msg and calls == []
        msg, calls = res[r]["bad_token"]
        assert "position (4,)" in msg and calls == []


def test_array_decomposition_matches_whole_rows():
    """gpuce._vocab without processes: 4 holders of uneven blocks, every reduction."""
    import gpuce

    rng = np.random.default_rng(11)
    n, c, sizes = 9, 507, [200, 7, 150, 150]
    f = rng.normal(size=(n, c)) * 3
    y = rng.integers(0, c, n)
    y[2] = -100
    w = rng.uniform(0.5, 2, c)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for red in ("none", "sum", "mean"):
        opts = dict(weight=w, label_smoothing=0.1, z_loss=0.01, softcap=4.0)
        want, want_g = gpuce.softmax_cross_entropy(f, y, reduction=red, return_grad=True, **opts)
        args = sce_args(ShapeOnly((n, c), f.dtype), y, reduction=red, ignore_index=-100,
                        return_grad=True, inplace=False, **opts)
        packed = np.stack([V.local_partials(np, f[:, a:a + k], a, args, y, w[a:a + k])
                           for a, k in zip(starts, sizes)])
        assert packed.shape == (4, n, len(V.PACKED)) and packed.dtype == np.float64
        res = V.combine_rows(np, packed, args, y, weighted=True)
        np.testing.assert_allclose(res["loss"], want, rtol=1e-12, atol=1e-13)
        g = np.concatenate([V.local_grad(np, f[:, a:a + k], a, args, res["rows"], res["scale"],
                                         y, w[a:a + k]) for a, k in zip(starts, sizes)], axis=1)
        np.testing.assert_allclose(g, want_g, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cuts", [[0, 37], [0, 1, 10, 10, 30, 37], [0, 18, 37]])
def test_token_array_decomposition_matches_whole_rows(dtype, cuts):
    """The token partials of class blocks (one empty), combined in order, give the whole
    rows' log p, H and gradient (gpuce._tokens_rows) with a NaN row, an all −inf row, a −inf
    token and an ignored row, with and without temperature and softcap."""
    from gpuce._tokens_rows import token_rows
    from gpuce._validation import token_args

    rng = np.random.default_rng(5)
    n, c = 9, 37
    x = (rng.standard_normal((n, c)) * 3).astype(dtype)
    x[2, 5] = -np.inf
    x[4, :] = -np.inf
    x[6, 3] = np.nan
    lab = rng.integers(0, c, n)
    lab[3] = -100
    lab[2] = 5  # the token sits on the −inf logit: log p = −inf
    gl = np.linspace(0.5, 1.5, n).astype(dtype)
    gh = np.linspace(-1, 1, n).astype(dtype)
    for cap, tau in ((None, 1.0), (5.0, 0.7)):
        args = token_args(ShapeOnly((n, c), x.dtype), lab, temperature=tau, softcap=cap,
                          ignore_index=-100, return_entropy=True, return_grad=True)
        lp, h, g = np.empty(n, dtype), np.empty(n, dtype), np.empty((n, c), dtype)
        token_rows(np, x, lab, args, lp, h, g, gl, gh)
        blocks = list(zip(cuts[:-1], cuts[1:]))
        packed = np.stack([V.token_local_partials(np, x[:, a:b], a, args, lab) for a, b in blocks])
        assert packed.shape == (len(blocks), n, 4) and packed.dtype == np.float64
        rows = V.token_combine_rows(np, packed, args, lab)
        got = np.concatenate([V.token_local_grad(np, x[:, a:b], a, args, rows, lab, gl, gh)
                              for a, b in blocks], axis=1)
        tol = dict(rtol=1e-12, atol=1e-13) if dtype == "float64" else dict(rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(rows["logp"], lp, **tol)
        np.testing.assert_allclose(rows["entropy"], h, **tol)
        np.testing.assert_allclose(got, g, **tol)
        assert np.isnan(rows["logp"][6]) and np.isnan(got[6]).all()
        assert rows["logp"][3] == 0 and rows["entropy"][3] == 0 and not got[3].any()
        if cap is None:  # a softcap makes −inf logits −s: finite rows
            assert np.isnan(rows["logp"][4]) and np.isnan(got[4]).all()
            assert rows["logp"][2] == -np.inf
        else:
            assert np.isfinite(rows["logp"][[2, 4]]).all()


def test_process_group_errors():
    x = torch.zeros(3, 4)
    t = torch.zeros(3, dtype=torch.long)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            gt.cross_entropy(x, t, process_group=object())
        with pytest.raises(RuntimeError, match="init_process_group"):
            gt.token_logprobs(x, t, process_group=object())
    with pytest.raises(ValueError, match="process_group"):
        gt.linear_cross_entropy(torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(3, 4),
                                process_group=object())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_cuda_world_size_one(backend, tmp_path):
    """CUDA tensors through the vocabulary-parallel path at world size 1, over gloo and NCCL:
    equal to the unsharded call (the fused kernels) within float32's bound."""
    if backend == "nccl" and not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    dist.init_process_group(backend, rank=0, world_size=1,
                            init_method="file://" + str(tmp_path / "store"))
    try:
        logits, labels, probs, weight, x, w, b = W.problem(64, 1000, 32)
        dev = "cuda"
        xs = logits.float().to(dev).requires_grad_(True)
        loss = gt.cross_entropy(xs, labels.to(dev), weight=weight.float().to(dev),
                                label_smoothing=0.1, z_loss=0.01, process_group=dist.group.WORLD)
        loss.backward()
        ref_x = logits.float().to(dev).requires_grad_(True)
        ref = gt.cross_entropy(ref_x, labels.to(dev), weight=weight.float().to(dev),
                               label_smoothing=0.1, z_loss=0.01)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(xs.grad, ref_x.grad, rtol=2e-5, atol=1e-7)
        xl = x.float().to(dev).requires_grad_(True)
        wl = w.float().to(dev).requires_grad_(True)
        lin = gt.linear_cross_entropy(xl, wl, labels.to(dev), process_group=dist.group.WORLD)
        lin.backward()
        xr = x.float().to(dev).requires_grad_(True)
        wr = w.float().to(dev).requires_grad_(True)
        ref = gt.linear_cross_entropy(xr, wr, labels.to(dev))
        ref.backward()
        torch.testing.assert_close(lin, ref, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(xl.grad, xr.grad, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(wl.grad, wr.grad, rtol=2e-5, atol=1e-6)
        xt = logits.float().to(dev).requires_grad_(True)
        lp, h = gt.token_logprobs(xt, labels.to(dev), return_entropy=True, temperature=0.8,
                                  process_group=dist.group.WORLD)
        (lp.sum() + h.sum()).backward()
        xu = logits.float().to(dev).requires_grad_(True)
        lpu, hu = gt.token_logprobs(xu, labels.to(dev), return_entropy=True, temperature=0.8)
        (lpu.sum() + hu.sum()).backward()
        torch.testing.assert_close(lp, lpu, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(h, hu, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(xt.grad, xu.grad, rtol=2e-5, atol=1e-6)
        heads = [(x.float().to(dev).requires_grad_(True), w.float().to(dev).requires_grad_(True))
                 for _ in range(2)]
        outs = [gt.linear_token_logprobs(hx, hw, labels.to(dev), return_entropy=True, **kw)
                for (hx, hw), kw in zip(heads, ({"process_group": dist.group.WORLD}, {}))]
        for lp_, h_ in outs:
            (lp_.sum() + h_.sum()).backward()
        torch.testing.assert_close(outs[0], outs[1], rtol=2e-6, atol=1e-6)
        for a, b_ in zip(heads[0], heads[1]):
            torch.testing.assert_close(a.grad, b_.grad, rtol=2e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
