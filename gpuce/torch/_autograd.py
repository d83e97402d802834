"""The pieces every gpuce.torch operator shares: the statistics outputs and their fakes, the
LLM-head options, the incoming gradient's scaling, the soft-target gradients, and the guard
that makes gradients first-order only."""

from __future__ import annotations

import numpy as np
import torch

from .. import _rowterms
from .. import _validation as _V
from ._bridge import _acc_of, _none, _to_tensor


_NO_DOUBLE_BACKWARD = (
    "gpuce.torch: double backward (differentiating {name}'s gradient again, e.g. after "
    "torch.autograd.grad(..., create_graph=True)) is not supported; use "
    "torch.nn.functional.cross_entropy where second derivatives are needed")


def _stats_tensors(st, like, return_stats):
    """A SceStats of arrays as the operators' four stats outputs: z_loss in the loss's dtype
    (like's), accuracy (empty for probability targets) and lse in the accumulation dtype, the
    predicted classes as int64; four empty tensors without return_stats."""
    if not return_stats:
        return _none(like), _none(like), _none(like), _none(like)
    acc = _acc_of(like.dtype)
    return (_to_tensor(st.z_loss, like.dtype),
            _none(like) if st.accuracy is None else _to_tensor(st.accuracy, acc),
            _to_tensor(st.lse, acc), _to_tensor(st.predicted, torch.int64))


def _stats_fake(like, lead, reduction, label, return_stats):
    """The fake (meta) stats outputs matching :func:`_stats_tensors`."""
    if not return_stats:
        return _none(like), _none(like), _none(like), _none(like)
    shape = tuple(lead) if reduction == "none" else ()
    acc = _acc_of(like.dtype)
    return (like.new_empty(shape), like.new_empty(shape, dtype=acc) if label else _none(like),
            like.new_empty(tuple(lead), dtype=acc), like.new_empty(tuple(lead), dtype=torch.int64))


def _llm_options(softcap, return_stats, check_labels):
    """The checked (softcap as a float, 0. for none; return_stats; check_labels)."""
    return _V.check_softcap(softcap), _V.check_flag(return_stats, "return_stats"), \
        _V.check_flag(check_labels, "check_labels")


def _capped(logits, softcap):
    """softcap · tanh(logits / softcap) as a new tensor (for the backward operators that form
    log q again), or the logits themselves."""
    return logits if not softcap else torch.tanh(logits / softcap) * softcap


def _times_incoming(grad, grad_loss, rows=False):
    """``grad`` times the incoming gradient (per row with ``rows``), the product formed in the
    accumulation dtype and rounded once to grad's dtype: a float32 incoming gradient (the loss
    of autocast) is never rounded to 16 bits first.  Exact for 1 and powers of two."""
    acc = _acc_of(grad.dtype)
    go = grad_loss.to(acc)
    return (grad.to(acc) * (go.unsqueeze(-1) if rows else go)).to(grad.dtype)


def _legacy_reduction(size_average, reduce, reduction):
    """torch's mapping of the deprecated size_average / reduce arguments."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    return "none" if not reduce else ("mean" if size_average else "sum")


def _row_scale(grad_loss, reduction, rows):
    """The factor s_i by which row i's gradient is scaled: the incoming gradient, per row for
    reduction="none", divided by the row count for the probability-target mean."""
    if reduction == "none":
        return grad_loss.unsqueeze(-1)
    return grad_loss / rows if reduction == "mean" else grad_loss


class _TensorOps:
    """:mod:`gpuce._rowterms`' ops adapter for tensors accumulating in ``acc`` (float32 or
    float64) on ``device``: scalars are Python floats rounded to ``acc`` (exact there)."""

    xp = torch
    _ROUND = {torch.float32: np.float32, torch.float64: np.float64}

    def __init__(self, acc, device):
        self.acc, self.device = acc, device
        self._round = self._ROUND[acc]

    def scalar(self, v):
        return float(self._round(v))

    def widen(self, a):
        return a.to(self.acc)

    def full(self, n, v):
        return torch.full((n,), self.scalar(v), dtype=self.acc, device=self.device)

    def scaled(self, a, v, out=None):
        return torch.mul(a.to(self.acc), self.scalar(v), out=out)


def _soft_target_grads(log_q, target, weight, scale, label_smoothing, target_grad, weight_grad):
    """∂/∂p and ∂/∂w of the loss for probability targets p (:func:`gpuce._rowterms.
    soft_target_grads`, A_ic = −log q_ic · s_i), each None where not asked for; in log_q's
    dtype (the accumulation dtype).  log_q: (..., C), scale: s_i (broadcast to log_q)."""
    ops = _TensorOps(log_q.dtype, log_q.device)
    return _rowterms.soft_target_grads(ops, -log_q * scale, target, weight, label_smoothing,
                                       target_grad, weight_grad)


class _NoDoubleBackward(torch.autograd.Function):
    """Marks gradients returned under create_graph=True: differentiating them again raises
    (gpuce's backward formulas are first-order only)."""

    @staticmethod
    def forward(ctx, name, *tensors):
        ctx.name = name
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NO_DOUBLE_BACKWARD.format(name=ctx.name))


def _first_order_only(name, grads):
    """``grads`` as they are; under create_graph=True (grad mode on in backward) each given
    one becomes an alias whose backward raises the double-backward error."""
    if not torch.is_grad_enabled():
        return grads
    given = [i for i, g in enumerate(grads) if g is not None]
    if not given:
        return grads
    marked = _NoDoubleBackward.apply(name, *(grads[i].detach().requires_grad_() for i in given))
    grads = list(grads)
    for i, g in zip(given, marked):
        grads[i] = g
    return tuple(grads)
