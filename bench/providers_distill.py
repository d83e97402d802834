"""Providers of the distillation benchmark (bench/bench_distill.py): one training step of the
linear (LM-head) form of logit distillation.  From the student's hidden states Xs (N, Ds) and
head Ws (V, Ds), the teacher's Xt (N, Dt) and Wt (V, Dt), at a temperature τ and a β, each
provider computes the mean over the rows of

    β = 0:      KL(p_T ‖ p_S)                                   (the forward KL)
    0 < β < 1:  β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M),  M = β p_T + (1 − β) p_S
    β = 1:      KL(p_S ‖ p_T)                                   (the reverse KL)

with p_S = softmax(Xs Wsᵀ / τ), p_T = softmax(Xt Wtᵀ / τ) (the generalised JSD as TRL's
generalized_jsd_loss defines it, no τ² factor), and the gradients of that loss with respect to
the student's Xs and Ws (the teacher is a constant).  Each provider is a zero-argument callable
returning its outputs, so the memory probe sees them; gradients are detached from the leaf
tensors before they are returned, so dropping the outputs frees them.

* ``gemms``        the matrix products alone, through gpuce's GEMM: the student's and the
                   teacher's logits (float32 from 16-bit inputs), then G Ws and Gᵀ Xs from a G
                   of Xs's dtype: the time floor of every provider
* ``gpuce``        gpuce.linear_distillation_loss(..., return_grad=True) on the ``xp`` arrays
                   (NumPy or CuPy), automatic chunks, ``check_finite=False``
* ``gpuce-torch``  gpuce.torch.linear_distillation_loss, only when gpuce.torch has it at run
                   time (called with the array function's positional and keyword arguments)
* ``torch``        the materialised reference (:func:`reference`): both models' logits in the
                   input dtype, float32 log_softmax, the divergence above, autograd backward
* ``torch-compile`` that reference under torch.compile(dynamic=False) (compiled in the warm-up)
* ``liger``        Liger-Kernel's LigerFusedLinearJSD(jsd_beta=β, temperature=τ), where it
                   imports (and accepts the β: some versions take only 0 < β < 1); its β
                   convention is taken to be TRL's, which this file has not checked

Loaded by path with ``gpuce.benchmark.load_providers("distill")``; the interface every provider
file has: OP, NAMES and :func:`providers`.  Importing it imports neither CuPy nor torch.
"""

from __future__ import annotations

import math

OP = "distill"
NAMES = ("gemms", "gpuce", "gpuce-torch", "torch", "torch-compile", "liger")


def reference(torch, xs, ws, xt, wt, beta, temperature):
    """The materialised torch reference: the mean over the rows of the divergence above, from
    both models' logits (formed in the input dtype, then float32) at ``temperature``."""
    log_s = torch.log_softmax((xs @ ws.T).float() / temperature, dim=-1)
    log_t = torch.log_softmax((xt @ wt.T).float() / temperature, dim=-1)
    if beta == 0:
        rows = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif beta == 1:
        rows = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
        rows = (beta * (log_t.exp() * (log_t - log_m)).sum(-1)
                + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1))
    return rows.mean()


def _tensor(torch, a, device):
    """A tensor copy of the array ``a`` (NumPy or CuPy) on ``device``; bfloat16 (ml_dtypes',
    which DLPack does not carry) through its int16 view, the same bits."""
    if a.dtype.name == "bfloat16":
        t = torch.from_dlpack(a.view("int16")).view(torch.bfloat16)
    else:
        t = torch.from_dlpack(a)
    return t.to(device).detach().clone()


def providers(xp, torch=None, *, Xs, Ws, Xt, Wt, beta=0.0, temperature=1.0):
    """name -> zero-argument callable on the ``xp`` arrays Xs (N, Ds), Ws (V, Ds) (one dtype)
    and Xt (N, Dt), Wt (V, Dt) (one dtype).  Every provider runs the forward and the backward
    (the student's dXs, dWs).  ``torch`` (the module; None leaves its providers out): the torch
    providers on torch copies of the inputs, on the device the arrays are on (the CPU for
    NumPy); gpuce.torch's and Liger's only where available."""
    import gpuce

    out = {}

    def gemms():
        from gpuce._blas import gemm  # gpuce's own products (cublasGemmEx for 16-bit)

        n, v = Xs.shape[0], Ws.shape[0]
        hs, ht = Xs.dtype.itemsize == 2, Xt.dtype.itemsize == 2
        f = xp.empty((n, v), "float32" if hs else Xs.dtype)
        ft = xp.empty((n, v), "float32" if ht else Xt.dtype)
        gemm(xp, "N", "T", Xs, Ws, f)  # the student's logits, float32 from 16-bit inputs
        gemm(xp, "N", "T", Xt, Wt, ft)  # the teacher's
        g = f.astype(Xs.dtype) if hs else f  # G rounded once to 16 bits, as gpuce does
        dX, dW = xp.empty_like(Xs), xp.empty_like(Ws)
        gemm(xp, "N", "N", g, Ws, dX)
        gemm(xp, "T", "N", g, Xs, dW)
        return ft, dX, dW

    out["gemms"] = gemms
    out["gpuce"] = lambda: gpuce.linear_distillation_loss(
        Xs, Ws, Xt, Wt, beta=beta, temperature=temperature, return_grad=True, check_finite=False)
    if torch is None:
        return out

    device = "cpu" if type(Xs).__module__.startswith("numpy") else "cuda"
    txs, tws, txt, twt = (_tensor(torch, a, device) for a in (Xs, Ws, Xt, Wt))
    txs.requires_grad_(True)
    tws.requires_grad_(True)

    def autograd(fn):
        """fn() -> the scalar loss, differentiated; the leaf gradients are handed over
        (detached from the leaves)."""

        def run():
            txs.grad = tws.grad = None
            loss = fn()
            loss.backward()
            gx, gw = txs.grad, tws.grad
            txs.grad = tws.grad = None
            return loss.detach(), gx, gw

        return run

    tgt = None
    try:
        import gpuce.torch as gt

        tgt = getattr(gt, "linear_distillation_loss", None)
    except Exception as e:  # noqa: BLE001
        print(f"gpuce-torch: not importable ({type(e).__name__}: {e})")
    if tgt is not None:
        out["gpuce-torch"] = autograd(
            lambda: tgt(txs, tws, txt, twt, beta=beta, temperature=temperature))

    out["torch"] = autograd(lambda: reference(torch, txs, tws, txt, twt, beta, temperature))
    for knob in ("cache_size_limit", "recompile_limit"):  # one compile a shape and β
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))
    compiled = torch.compile(lambda a, b, c, d: reference(torch, a, b, c, d, beta, temperature),
                             dynamic=False)
    out["torch-compile"] = autograd(lambda: compiled(txs, tws, txt, twt))
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)
        out["liger"] = autograd(lambda: liger(txs, tws, txt, twt))
    except Exception as e:  # noqa: BLE001  (not installed, or this β not accepted)
        print(f"liger: not available ({type(e).__name__}: {e})")
    return out
