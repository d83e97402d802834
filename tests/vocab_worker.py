"""One rank of the vocabulary-parallel tests (tests/test_vocab_parallel.py), started by
torch.multiprocessing.spawn over gloo: it builds the same global problem as every rank (from a
seed), takes its block of the classes, runs every case and saves the loss, the statistics, the
local gradients and the collectives it called."""

import os

import numpy as np
import torch
import torch.distributed as dist

import gpuce.torch as gt

CASES = [
    # (name, kind, dtype, options)
    ("plain", "label", "float64", dict(reduction="mean")),
    ("sum", "label", "float64", dict(reduction="sum")),
    ("none", "label", "float64", dict(reduction="none")),
    ("every", "label", "float64", dict(reduction="mean", weight=True, label_smoothing=0.1,
                                        z_loss=0.01, softcap=5.0, return_stats=True)),
    ("every_none", "label", "float64", dict(reduction="none", weight=True, label_smoothing=0.2,
                                             z_loss=0.01, softcap=5.0, return_stats=True)),
    ("every_sum", "label", "float64", dict(reduction="sum", weight=True, label_smoothing=0.1,
                                            z_loss=0.02, return_stats=True)),
    ("prob", "prob", "float64", dict(reduction="mean", weight=True, label_smoothing=0.1,
                                      z_loss=0.01, softcap=5.0, return_stats=True)),
    ("float32", "label", "float32", dict(reduction="mean", label_smoothing=0.1)),
    ("bfloat16", "label", "bfloat16", dict(reduction="mean", z_loss=0.01, softcap=5.0)),
]
LINEAR_CASES = [
    ("lin_mean", "float64", dict(reduction="mean", weight=True, label_smoothing=0.1, z_loss=0.01,
                                 softcap=5.0, return_stats=True, chunk_size=5)),
    ("lin_none", "float64", dict(reduction="none", chunk_size=7)),
    ("lin_bf16", "bfloat16", dict(reduction="sum", chunk_size=8)),
]

TOKEN_CASES = [
    # (name, dtype, options of gpuce.torch.token_logprobs)
    ("tok", "float64", dict(return_entropy=True)),
    ("tok_tau_cap", "float64", dict(return_entropy=True, temperature=0.7, softcap=5.0)),
    ("tok_logp", "float64", dict(temperature=1.3)),
    ("tok_bf16", "bfloat16", dict(return_entropy=True, softcap=5.0)),
]
LINEAR_TOKEN_CASES = [
    ("ltok", "float64", dict(return_entropy=True, temperature=0.8, softcap=4.0, chunk_size=5)),
    ("ltok_logp", "float64", dict(chunk_size=7)),
    ("ltok_bf16", "bfloat16", dict(return_entropy=True, chunk_size=8)),
]


def problem(n, c, d, seed=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    logits[2, 11] = float("-inf")
    labels = torch.randint(0, c, (n,), generator=g)
    labels[3] = -100
    labels[5] = c - 1  # in the last rank's block
    probs = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    return logits, labels, probs, weight, x, w, b


def token_objective(logp, ent):
    """Σ g_l log p + g_H H with fixed incoming gradients (g_H's of both signs)."""
    obj = (logp * torch.linspace(0.5, 1.5, logp.numel(), dtype=logp.dtype)).sum()
    if ent is not None:
        obj = obj + (ent * torch.linspace(-1, 1, ent.numel(), dtype=ent.dtype)).sum()
    return obj


def _token_result(counter, opts, call):
    """Run a token call (``call(opts)``) and its backward: outputs, bits and collectives."""
    mark = len(counter.calls)
    out = call(opts)
    logp, ent = out if opts.get("return_entropy") else (out, None)
    fwd = counter.calls[mark:]
    mark = len(counter.calls)
    token_objective(logp, ent).backward()
    return dict(logp=logp.detach().double().numpy(),
                logp_bits=logp.detach().view(torch.uint8).numpy().tobytes(),
                ent=None if ent is None else ent.detach().double().numpy(),
                fwd=fwd, bwd=counter.calls[mark:])


def blocks(sizes):
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    return [(int(a), int(a + s)) for a, s in zip(starts, sizes)]


def _dtype(name):
    return getattr(torch, name)


class Counter:
    def __init__(self):
        self.calls = []
        self._orig = {}
        for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast",
                     "reduce_scatter", "all_to_all"):
            fn = getattr(dist, name)
            self._orig[name] = fn
            setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return counted


def run(rank, world, sizes, n, d, init, out):
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=init)
    counter = Counter()
    logits, labels, probs, weight, x, w, b = problem(n, sum(sizes), d)
    lo, hi = blocks(sizes)[rank]
    results = {}
    # the sizes exchange happens once per group and local size: a warm-up call first
    gt.cross_entropy(logits[:, lo:hi], labels, process_group=dist.group.WORLD)
    counter.calls.clear()
    for name, kind, dtype, opts in CASES:
        opts = dict(opts)
        wt = weight[lo:hi] if opts.pop("weight", False) else None
        xs = logits[:, lo:hi].to(_dtype(dtype)).clone().requires_grad_(True)
        tgt = labels if kind == "label" else probs[:, lo:hi].to(_dtype(dtype))
        if wt is not None:
            wt = wt.to(_dtype(dtype))
        mark = len(counter.calls)
        out_ = gt.cross_entropy(xs, tgt, weight=wt, process_group=dist.group.WORLD, **opts)
        loss, st = out_ if opts.get("return_stats") else (out_, None)
        fwd = counter.calls[mark:]
        mark = len(counter.calls)
        g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        loss.backward(g)
        bwd = counter.calls[mark:]
        results[name] = dict(loss=loss.detach().float().double().numpy() if dtype == "bfloat16"
                             else loss.detach().numpy(),
                             loss_bits=loss.detach().view(-1).view(torch.uint8).numpy().tobytes(),
                             grad=xs.grad.double().numpy(), fwd=fwd, bwd=bwd,
                             stats=None if st is None else [
                                 None if v is None else v.double().numpy() for v in st])
    for name, dtype, opts in LINEAR_CASES:
        opts = dict(opts)
        wt = weight[lo:hi].to(_dtype(dtype)) if opts.pop("weight", False) else None
        xs = x.to(_dtype(dtype)).clone().requires_grad_(True)
        ws = w[lo:hi].to(_dtype(dtype)).clone().requires_grad_(True)
        bs = b[lo:hi].to(_dtype(dtype)).clone().requires_grad_(True)
        mark = len(counter.calls)
        out_ = gt.linear_cross_entropy(xs, ws, labels, linear_bias=bs, weight=wt,
                                       process_group=dist.group.WORLD, **opts)
        loss, st = out_ if opts.get("return_stats") else (out_, None)
        fwd = counter.calls[mark:]
        mark = len(counter.calls)
        g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        loss.backward(g)
        bwd = counter.calls[mark:]
        results[name] = dict(loss=loss.detach().double().numpy(),
                             loss_bits=loss.detach().view(-1).view(torch.uint8).numpy().tobytes(),
                             dx=xs.grad.double().numpy(), dw=ws.grad.double().numpy(),
                             db=bs.grad.double().numpy(), fwd=fwd, bwd=bwd,
                             stats=None if st is None else [
                                 None if v is None else v.double().numpy() for v in st])
    for name, dtype, opts in TOKEN_CASES:
        xs = logits[:, lo:hi].to(_dtype(dtype)).clone().requires_grad_(True)
        results[name] = _token_result(counter, opts, lambda o: gt.token_logprobs(
            xs, labels, process_group=dist.group.WORLD, **o))
        results[name]["grad"] = xs.grad.double().numpy()
    for name, dtype, opts in LINEAR_TOKEN_CASES:
        xs, ws, bs = (v.to(_dtype(dtype)).clone().requires_grad_(True) for v in (x, w[lo:hi], b[lo:hi]))
        results[name] = _token_result(counter, opts, lambda o: gt.linear_token_logprobs(
            xs, ws, labels, bias=bs, process_group=dist.group.WORLD, **o))
        results[name].update(dx=xs.grad.double().numpy(), dw=ws.grad.double().numpy(),
                             db=bs.grad.double().numpy())
    # a bad label raises the same ValueError on every rank, before any collective
    mark = len(counter.calls)
    bad = labels.clone()
    bad[4] = sum(sizes) + 3
    try:
        gt.cross_entropy(logits[:, lo:hi], bad, process_group=dist.group.WORLD)
        results["bad_label"] = None
    except ValueError as e:
        results["bad_label"] = (str(e), counter.calls[mark:])
    mark = len(counter.calls)
    try:
        gt.token_logprobs(logits[:, lo:hi], bad, process_group=dist.group.WORLD)
        results["bad_token"] = None
    except ValueError as e:
        results["bad_token"] = (str(e), counter.calls[mark:])
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
