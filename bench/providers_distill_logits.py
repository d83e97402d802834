"""Providers of the dense-logits distillation benchmark (bench/bench_distill_logits.py): the
forward and backward of the distillation loss on materialised logits.  From the student's
logits S (N, V) and the teacher's T (N, V) (one dtype), at a temperature τ and a β, each
provider computes the mean over the rows of

    β = 0:      KL(p_T ‖ p_S)                                   (the forward KL)
    0 < β < 1:  β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M),  M = β p_T + (1 − β) p_S
    β = 1:      KL(p_S ‖ p_T)                                   (the reverse KL)

with p_S = softmax(S / τ), p_T = softmax(T / τ) (TRL's generalised JSD, no τ² factor) and its
gradient with respect to S (the teacher is a constant).  Each provider is a zero-argument
callable returning its outputs (the loss and the student's gradient), so the memory probe sees
them; the gradient is detached from the leaf before it is returned.

* ``gpuce``          gpuce.distillation_loss(S, T, beta=β, temperature=τ, return_grad=True) on
                     the ``xp`` arrays (NumPy or CuPy)
* ``gpuce-torch``    gpuce.torch.distillation_loss (the custom op; autograd backward)
* ``torch``          :func:`reference`: float32 log_softmax of both at τ, the divergence written
                     out from the definitions above, autograd
* ``torch-compile``  that reference under torch.compile(dynamic=False) (compiled in the warm-up)
* ``liger-jsd``      Liger-Kernel's LigerJSD on the float32 log-probabilities at τ (the
                     log_softmax in torch is part of the timed call), where it imports
* ``liger-kldiv``    Liger-Kernel's LigerKLDIVLoss(reduction="batchmean", log_target=True) on
                     the same log-probabilities, β = 0 only (it is the forward KL and nothing
                     else)

Liger's conventions are not taken on trust: LigerJSD's ``beta`` weights its two KL terms in a
way whose orientation (which of its arguments is P, which Q; whether β = 0 / 1 are the
forward / reverse KL or the other way round) has changed between releases, and LigerJSD takes
log-probabilities (input = the student's, target = the teacher's), not logits.  So a Liger
provider is included only where, on the first four rows of this problem, its loss agrees with
:func:`reference` (relative 1e-3); otherwise it is left out with a printed reason.  Liger is
never required (Triton, CUDA only).

Loaded by path with ``gpuce.benchmark.load_providers("distill_logits")``; the interface every
provider file has: OP, NAMES and :func:`providers`.  Importing it imports neither CuPy nor torch.
"""

from __future__ import annotations

import math

OP = "distill_logits"
NAMES = ("gpuce", "gpuce-torch", "torch", "torch-compile", "liger-jsd", "liger-kldiv")


def reference(torch, s, t, beta, temperature):
    """The eager torch reference: the mean over the rows of the divergence above, from the
    student's and teacher's logits (any float dtype, taken to float32 at τ)."""
    log_s = torch.log_softmax(s.float() / temperature, dim=-1)
    log_t = torch.log_softmax(t.float() / temperature, dim=-1)
    if beta == 0:  # KL(p_T ‖ p_S)
        rows = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif beta == 1:  # KL(p_S ‖ p_T)
        rows = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:  # log M = log(β p_T + (1 − β) p_S), formed from the log-probabilities
        log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
        kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
        kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
        rows = beta * kl_t + (1 - beta) * kl_s
    return rows.mean()


def _liger(torch, beta, temperature, ts, tt):
    """{name: fn(s, t) -> scalar loss} of the Liger losses that compute this β's quantity
    (checked against :func:`reference` on the first rows), with a printed reason for each left
    out."""
    found = {}
    try:
        from liger_kernel.transformers import LigerJSD

        jsd = LigerJSD(beta=beta)
        found["liger-jsd"] = lambda s, t: jsd(torch.log_softmax(s.float() / temperature, -1),
                                              torch.log_softmax(t.float() / temperature, -1))
    except Exception as e:  # noqa: BLE001  (not installed, or this β not accepted)
        print(f"liger-jsd: not available ({type(e).__name__}: {e})")
    if beta == 0:
        try:
            from liger_kernel.transformers import LigerKLDIVLoss

            kld = LigerKLDIVLoss(reduction="batchmean", log_target=True)
            found["liger-kldiv"] = lambda s, t: kld(torch.log_softmax(s.float() / temperature, -1),
                                                    torch.log_softmax(t.float() / temperature, -1))
        except Exception as e:  # noqa: BLE001
            print(f"liger-kldiv: not available ({type(e).__name__}: {e})")
    out = {}
    s4, t4 = ts[:4].detach().clone(), tt[:4]
    want = float(reference(torch, s4, t4, beta, temperature))
    for name, fn in found.items():
        try:
            got = float(fn(s4, t4))
        except Exception as e:  # noqa: BLE001
            print(f"{name}: left out, failed on the check rows ({type(e).__name__}: {e})")
            continue
        if abs(got - want) <= 1e-3 * abs(want) + 1e-6:
            out[name] = fn
        else:
            print(f"{name}: left out, computes another quantity at beta={beta:g} "
                  f"(loss {got:.6g}, the reference's {want:.6g})")
    return out


def providers(xp, torch=None, *, S, T, beta=0.0, temperature=1.0):
    """name -> zero-argument callable on the ``xp`` arrays S (N, V) (the student's logits) and
    T (N, V) (the teacher's).  Every provider runs the forward and the backward (the
    student's gradient).  ``torch`` (the module; None leaves its providers out): the torch
    providers on torch copies of the inputs, on the device the arrays are on (the CPU for
    NumPy); gpuce.torch's and Liger's only where available."""
    import gpuce
    from gpuce.benchmark import load_providers

    out = {"gpuce": lambda: gpuce.distillation_loss(S, T, beta=beta, temperature=temperature,
                                                    return_grad=True)}
    if torch is None:
        return out

    to_tensor = load_providers("distill")._tensor  # the linear form's array -> tensor copy
    device = "cpu" if type(S).__module__.startswith("numpy") else "cuda"
    ts, tt = to_tensor(torch, S, device), to_tensor(torch, T, device)
    ts.requires_grad_(True)

    def autograd(fn):
        """fn(s, t) -> the scalar loss, differentiated with respect to s; the gradient handed
        over (detached from the leaf)."""

        def run():
            ts.grad = None
            loss = fn(ts, tt)
            loss.backward()
            g, ts.grad = ts.grad, None
            return loss.detach(), g

        return run

    try:
        import gpuce.torch as gt

        out["gpuce-torch"] = autograd(
            lambda s, t: gt.distillation_loss(s, t, beta=beta, temperature=temperature))
    except Exception as e:  # noqa: BLE001
        print(f"gpuce-torch: not importable ({type(e).__name__}: {e})")
    out["torch"] = autograd(lambda s, t: reference(torch, s, t, beta, temperature))
    for knob in ("cache_size_limit", "recompile_limit"):  # one compile a shape and β
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))
    compiled = torch.compile(lambda s, t: reference(torch, s, t, beta, temperature), dynamic=False)
    out["torch-compile"] = autograd(compiled)
    if device == "cuda":  # Liger is Triton: CUDA only
        for name, fn in _liger(torch, beta, temperature, ts, tt).items():
            out[name] = autograd(fn)
    return out
