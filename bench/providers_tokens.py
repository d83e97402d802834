"""Providers of the token log-probability benchmark (bench/bench_tokens.py): the linear form of
RL training's per-token quantities.  From hidden states X (N, D), a head W (V, D) and tokens y
(N,), at a temperature τ, each provider computes

    log p_i = u_{i,y_i} − logsumexp(u_i)   and   H_i = entropy of softmax(u_i),   u = X Wᵀ / τ,

(``backward=False``: the forward only), or those and the gradients of Σ log p + 0.1 Σ H with
respect to X and W (``backward=True``).  Each provider is a zero-argument callable returning
its outputs, so the memory probe sees them; gradients are detached from the leaf tensors
before they are returned, so dropping the outputs frees them.

* ``gpuce``        gpuce.linear_token_logprobs on the ``xp`` arrays (NumPy or CuPy), automatic
                   chunks, ``check_finite=False``
* ``gpuce-torch``  gpuce.torch.linear_token_logprobs, only when gpuce.torch has it at run time
* ``torch``        the materialised reference: logits = x @ Wᵀ in the input dtype, float32
                   log_softmax, gather and entropy, autograd backward
* ``torch-compile`` that reference under torch.compile(dynamic=False) (compiled in the warm-up)
* ``liger``        Liger-Kernel's LigerFusedLinearCrossEntropyLoss(reduction="none") on x / τ,
                   where importable: −CE_i is log p_i; it has **no entropy** (its rows time
                   log p alone, and its backward is that of Σ log p only, an incoming gradient
                   of −1 on every row)
* ``gemms``        the matrix products alone, through gpuce's GEMM (X Wᵀ into float32 logits;
                   with backward also G W and Gᵀ X from a G of X's dtype): the time floor of
                   every provider

Loaded by path with ``gpuce.benchmark.load_providers("tokens")``; the interface every
provider file has: OP, NAMES and :func:`providers`.  Importing it imports neither CuPy nor
torch.
"""

from __future__ import annotations

OP = "tokens"
NAMES = ("gemms", "gpuce", "gpuce-torch", "torch", "torch-compile", "liger")
ENTROPY_WEIGHT = 0.1  # the objective of the backward: Σ log p + ENTROPY_WEIGHT Σ H


def reference(torch, x, w, y, temperature):
    """The materialised torch reference: (log p, H), float32, of the logits x @ wᵀ (formed in
    the input dtype) at ``temperature``."""
    u = (x @ w.T).float() / temperature
    logq = torch.log_softmax(u, dim=-1)
    logp = logq.gather(1, y[:, None]).squeeze(1)
    entropy = -(logq.exp() * logq).sum(-1)
    return logp, entropy


def _tensor(torch, a, device):
    """A tensor copy of the array ``a`` (NumPy or CuPy) on ``device``; bfloat16 (ml_dtypes',
    which DLPack does not carry) through its int16 view, the same bits."""
    if a.dtype.name == "bfloat16":
        t = torch.from_dlpack(a.view("int16")).view(torch.bfloat16)
    else:
        t = torch.from_dlpack(a)
    return t.to(device).detach().clone()


def providers(xp, torch=None, *, X, W, y, temperature=1.0, backward=True):
    """name -> zero-argument callable on the ``xp`` arrays X (N, D), W (V, D) (same dtype) and
    int64 tokens y (N,).  ``torch`` (the module; None leaves its providers out): the torch
    providers on torch copies of the inputs, on the device the arrays are on (the CPU for
    NumPy); gpuce.torch's and Liger's only where available."""
    import gpuce

    out = {}
    inv_tau = 1.0 / temperature

    half = X.dtype.itemsize == 2

    def gemms():
        from gpuce._blas import gemm  # gpuce's own products (cublasGemmEx for 16-bit)

        f = xp.empty((X.shape[0], W.shape[0]), "float32" if half else X.dtype)
        gemm(xp, "N", "T", X, W, f)  # the logits, float32 from 16-bit inputs, as gpuce forms them
        if not backward:
            return f
        g = f.astype(X.dtype) if half else f  # G rounded once to 16 bits, as gpuce does
        dX, dW = xp.empty_like(X), xp.empty_like(W)
        gemm(xp, "N", "N", g, W, dX)
        gemm(xp, "T", "N", g, X, dW)
        return dX, dW

    out["gemms"] = gemms
    if backward:
        n = X.shape[0]
        g_logp = xp.ones(n, "float32")
        g_entropy = xp.full(n, ENTROPY_WEIGHT, "float32")
        out["gpuce"] = lambda: gpuce.linear_token_logprobs(
            X, W, y, temperature=temperature, return_entropy=True, return_grad=True,
            grad_logprobs=g_logp, grad_entropy=g_entropy, check_finite=False)
    else:
        out["gpuce"] = lambda: gpuce.linear_token_logprobs(
            X, W, y, temperature=temperature, return_entropy=True, check_finite=False)
    if torch is None:
        return out

    device = "cpu" if type(X).__module__.startswith("numpy") else "cuda"
    tx, tw = _tensor(torch, X, device), _tensor(torch, W, device)
    ty = _tensor(torch, y, device)
    if backward:
        tx.requires_grad_(True)
        tw.requires_grad_(True)

    def autograd(fn, objective):
        """fn() -> outputs; with backward, objective(outputs) is differentiated and the leaf
        gradients are handed over (detached from the leaves)."""
        if not backward:
            def forward():
                with torch.no_grad():
                    return fn()

            return forward

        def run():
            tx.grad = tw.grad = None
            res = fn()
            objective(res).backward()
            gx, gw = tx.grad, tw.grad
            tx.grad = tw.grad = None
            return res, gx, gw

        return run

    def log_p_and_h(res):
        logp, entropy = res
        return logp.sum() + ENTROPY_WEIGHT * entropy.sum()

    tgt = None
    try:
        import gpuce.torch as gt

        tgt = getattr(gt, "linear_token_logprobs", None)
    except Exception as e:  # noqa: BLE001
        print(f"gpuce-torch: not importable ({type(e).__name__}: {e})")
    if tgt is not None:
        out["gpuce-torch"] = autograd(
            lambda: tgt(tx, tw, ty, temperature=temperature, return_entropy=True), log_p_and_h)

    out["torch"] = autograd(lambda: reference(torch, tx, tw, ty, temperature), log_p_and_h)
    for knob in ("cache_size_limit", "recompile_limit"):  # one compile a shape and mode
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))
    compiled = torch.compile(lambda x, w, t: reference(torch, x, w, t, temperature), dynamic=False)
    out["torch-compile"] = autograd(lambda: compiled(tx, tw, ty), log_p_and_h)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def liger_logp():
            return -liger(tw, tx * inv_tau, ty)  # −CE of u = (x / τ) Wᵀ is log p

        out["liger"] = autograd(liger_logp, lambda logp: logp.sum())
    except Exception as e:  # noqa: BLE001
        print(f"liger: not importable ({type(e).__name__}: {e})")
    return out
