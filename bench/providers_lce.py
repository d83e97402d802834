"""Providers of the large-vocabulary linear cross-entropy benchmark (bench/bench_lce.py): each
a zero-argument callable computing the mean loss of ``F.cross_entropy(X Wᵀ, y)`` and the
gradients dX and dW of one batch, returning its outputs (so the memory probe sees them):

* ``gpuce``            gpuce.linear_cross_entropy, automatic chunk size
* ``gpuce[chunk=K]``   the same with chunk_size=K
* ``three-gemms``      the three matrix products alone (X Wᵀ, G W, Gᵀ X): the time goal's basis
* ``torch``            F.linear + F.cross_entropy with materialised logits, autograd
* ``liger``            Liger-Kernel's LigerFusedLinearCrossEntropyLoss, where importable
* ``cce``              Cut Cross-Entropy's linear_cross_entropy, where importable

Loaded by path with ``gpuce.benchmark.load_providers("lce")``, which bench/bench_lce.py's
sweep calls; the interface every provider file has: OP, NAMES and :func:`providers`.
Importing it imports neither CuPy nor torch.
"""

from __future__ import annotations

OP = "linear_ce"
# every provider name (and "gpuce[chunk=K]" for each chunk size asked for)
NAMES = ("three-gemms", "gpuce", "torch", "liger", "cce")


def _torch_inputs(torch, X, W, y):
    tx = torch.from_dlpack(X).detach().clone().requires_grad_(True)
    tw = torch.from_dlpack(W).detach().clone().requires_grad_(True)
    return tx, tw, torch.from_dlpack(y)


def providers(cp, torch=None, *, X, W, y, chunks=()):
    """name -> zero-argument callable returning its outputs (so the memory probe sees them), on
    CuPy hidden states X (N, D), weights W (C, D) and int64 labels y.  ``torch`` (the module,
    given when it sees a CUDA device; None leaves them out): torch, Liger and CCE, the last two
    where importable."""
    import gpuce

    out = {}

    def three_gemms():
        f = X @ W.T
        return f @ W, f.T @ X

    out["three-gemms"] = three_gemms

    def gpuce_call(chunk):
        return lambda: gpuce.linear_cross_entropy(X, W, y, return_grad=True, check_finite=False,
                                                  chunk_size=chunk)

    out["gpuce"] = gpuce_call(None)
    for k in chunks:
        out[f"gpuce[chunk={k}]"] = gpuce_call(k)
    if torch is None:
        return out
    F = torch.nn.functional
    tx, tw, ty = _torch_inputs(torch, X, W, y)

    def autograd(loss_fn):
        def run():
            tx.grad = tw.grad = None
            loss = loss_fn()
            loss.backward()
            return loss, tx.grad, tw.grad

        return run

    out["torch"] = autograd(lambda: F.cross_entropy(F.linear(tx, tw), ty))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = autograd(lambda: liger(tw, tx, ty))
    except Exception as e:  # noqa: BLE001
        print(f"liger: not importable ({type(e).__name__}: {e})")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cce"] = autograd(lambda: cce(tx, tw, ty))
    except Exception as e:  # noqa: BLE001
        print(f"cce: not importable ({type(e).__name__}: {e})")
    return out
