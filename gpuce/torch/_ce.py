"""gpuce.torch.cross_entropy: the ``gpuce::cross_entropy`` operator and its backward operator
(class axis last): their implementations, fakes and autograd as spec entries (:mod:`._spec`),
and the F.cross_entropy-compatible function."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _results
from ..sce import softmax_cross_entropy as _sce
from ..softmax import log_softmax as _log_softmax
from .._validation import check_reduction
from ._autograd import (_capped, _legacy_reduction, _llm_options, _row_scale, _soft_target_grads,
                        _stats_fake, _stats_tensors, _times_incoming)
from ._bridge import (_HALF, _acc_of, _autocast_dtype, _autocast_to, _check_device, _check_dtype,
                      _device_of, _none, _to_array, _to_tensor)
from ._spec import OpSpec, define


# ---------------------------------------------------------------------------------------
# cross_entropy
# ---------------------------------------------------------------------------------------

def _ce_impl(logits: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str,
             ignore_index: int, label_smoothing: float, z_loss: float,
             logits_grad: bool, softcap: float = 0.0, return_stats: bool = False,
             check_labels: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """gpuce.softmax_cross_entropy on (..., C) logits: the loss (logits' dtype), with
    logits_grad the gradient of the loss with respect to the logits (else empty), and with
    return_stats the statistics z_loss, accuracy, lse (else empty)."""
    with _device_of(logits):
        out = _sce(_to_array(logits), _to_array(target), weight=_to_array(weight),
                   reduction=reduction, ignore_index=ignore_index,
                   label_smoothing=label_smoothing, z_loss=z_loss, return_grad=logits_grad,
                   softcap=softcap or None, return_stats=return_stats,
                   check_labels=check_labels)
        out = out if isinstance(out, tuple) else (out,)
        loss, grad = out[0], (out[1] if logits_grad else None)
        return (_to_tensor(loss, logits.dtype),
                _none(logits) if grad is None else _to_tensor(grad, logits.dtype),
                *_stats_tensors(out[-1], logits, return_stats))


def _ce_fake(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, logits_grad,
             softcap=0.0, return_stats=False, check_labels=True):
    check_reduction(reduction)
    shape = logits.shape[:-1] if reduction == "none" else ()
    return (logits.new_empty(shape),
            logits.new_empty(logits.shape) if logits_grad else _none(logits),
            *_stats_fake(logits, logits.shape[:-1], reduction, not target.is_floating_point(),
                         return_stats))


def _ce_setup_context(ctx, inputs, output):
    """Keeps the forward pass's gradient; the logits and the target only where backward
    needs them (gradients for the target or the weight, or no gradient computed forward),
    so that the N x C logits are not held until backward for nothing."""
    (logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, logits_grad,
     softcap, return_stats, check_labels) = inputs
    need_x, need_t, need_w = ctx.needs_input_grad[:3]
    # the gradient, the z-loss part, the accuracy and the predicted classes carry no gradient;
    # the per-row lse does
    ctx.mark_non_differentiable(*output[1:4], output[5])
    ctx.set_materialize_grads(False)  # None for an output that is not used
    ctx.recompute = need_x and not logits_grad
    # with return_stats the logits are kept for lse's gradient (softmax of the logits)
    ctx.lse_kept = need_x and return_stats  # lse computed (else an empty placeholder)
    keep = ctx.recompute or need_t or need_w or ctx.lse_kept
    ctx.save_for_backward(output[1] if logits_grad else None, *((logits, target, weight) if keep
                                                              else (None, None, None)))
    ctx.opts = (reduction, ignore_index, label_smoothing, z_loss)
    ctx.llm = (softcap, check_labels)
    ctx.loss_meta = (output[0].shape, output[0].dtype, output[0].device)


def _zero_incoming(ctx):
    """The incoming gradient of a loss that is not used (only its lse is differentiated)."""
    shape, dtype, device = ctx.loss_meta
    return torch.zeros(shape, dtype=dtype, device=device)


def _lse_grad(logits, grad_lse, softcap):
    """∂(Σ_i g_i lse_i)/∂f_ij = g_i q_ij (q = softmax of the (capped) logits, times the cap's
    derivative 1 − tanh²(f/s) with a softcap), in the accumulation dtype."""
    acc = _acc_of(logits.dtype)
    f = logits.to(acc)
    q = torch.softmax(_capped(f, softcap), dim=-1) * grad_lse.to(acc).unsqueeze(-1)
    if softcap:
        q = q * (1.0 - torch.tanh(f / softcap) ** 2)
    return q


def _ce_backward(ctx, grad_loss, _g_grad, _g_z, _g_acc, grad_lse, _g_predicted):
    grad, logits, target, weight = ctx.saved_tensors
    need_x, need_t, need_w = ctx.needs_input_grad[:3]
    reduction = ctx.opts[0]
    d_x = d_t = d_w = None
    if grad_loss is None:  # only the lse is differentiated
        grad_loss = _zero_incoming(ctx)
    if need_x and not ctx.recompute:
        d_x = _times_incoming(grad, grad_loss, reduction == "none")
    if ctx.recompute or need_t or need_w:
        d = CROSS_ENTROPY_BACKWARD(grad_loss, logits, target, weight, *ctx.opts, ctx.recompute,
                                   need_t, need_w, *ctx.llm)
        d_x = d[0] if ctx.recompute else d_x
        d_t, d_w = (d[1] if need_t else None), (d[2] if need_w else None)
    if need_x and grad_lse is not None and ctx.lse_kept:
        d_lse = _lse_grad(logits, grad_lse, ctx.llm[0])
        d_x = (d_lse if d_x is None else d_x.to(d_lse.dtype) + d_lse).to(logits.dtype)
    return d_x, d_t, d_w


def _ce_backward_impl(grad_loss: Tensor, logits: Tensor, target: Tensor,
                      weight: Optional[Tensor], reduction: str, ignore_index: int,
                      label_smoothing: float, z_loss: float, logits_grad: bool,
                      target_grad: bool, weight_grad: bool, softcap: float = 0.0,
                      check_labels: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ g·L (g = grad_loss) with respect to the logits (gpuce's fused pass
    again: for a forward pass that did not compute it), the probability target and the
    class weight; empty where not asked for.

    With p′ = (1−ε) p + ε/C and A_ic = −log q_ic · s_i (s_i the row's share of g: g_i for
    reduction="none", g for "sum", g/N for "mean", N the number of rows):
    ∂/∂p_ic = (1−ε) w_c A_ic and ∂/∂w_c = Σ_i p′_ic A_ic (log q from gpuce.log_softmax,
    of the capped logits s·tanh(f/s) with a softcap).
    """
    d_input, d_target, d_weight = _none(logits), _none(logits), _none(logits)
    if logits_grad and reduction == "none" and logits.dtype in _HALF:
        d_input = _half_rows_grad(grad_loss, logits, target, weight, ignore_index,
                                  label_smoothing, z_loss, softcap, check_labels)
    elif logits_grad:
        grad = _ce_impl(logits, target, weight, reduction, ignore_index, label_smoothing,
                        z_loss, True, softcap, False, check_labels)[1]
        d_input = _times_incoming(grad, grad_loss, reduction == "none")
    if target_grad or weight_grad:
        c = logits.shape[-1]
        acc = torch.float32 if logits.dtype in _HALF else logits.dtype
        with _device_of(logits):
            log_q = _to_tensor(_log_softmax(_to_array(_capped(logits, softcap)), axis=-1), acc)
        scale = _row_scale(grad_loss.to(acc), reduction, logits.numel() // c if c else 0)
        dt, dw = _soft_target_grads(log_q, target, weight, scale, label_smoothing, target_grad,
                                    weight_grad)
        if dt is not None:
            d_target = dt.to(target.dtype).contiguous()
        if dw is not None:
            d_weight = dw.to(weight.dtype).contiguous()
    return d_input, d_target, d_weight


def _half_rows_grad(grad_loss, logits, target, weight, ignore_index, label_smoothing, z_loss,
                    softcap, check_labels):
    """The gradient of Σ_i g_i L_i for 16-bit logits, rounded once: row blocks of about 2^22
    values widened to float32 (exact), their float32 gradient scaled by the rows' g_i there,
    then rounded to the logits' dtype.  (Scaling a 16-bit gradient by g_i would round it
    twice, and lose what underflows before the scaling.)"""
    c = logits.shape[-1]
    x2 = logits.reshape(-1, c)
    t2 = target.reshape(-1, c) if target.is_floating_point() else target.reshape(-1)
    g2 = grad_loss.reshape(-1).to(torch.float32)
    out = torch.empty(x2.shape, dtype=logits.dtype, device=logits.device)
    step = max(1, (1 << 22) // max(c, 1))
    for lo in range(0, x2.shape[0], step):
        hi = min(x2.shape[0], lo + step)
        grad = _ce_impl(x2[lo:hi].to(torch.float32), t2[lo:hi], weight, "none", ignore_index,
                        label_smoothing, z_loss, True, softcap, False, check_labels)[1]
        out[lo:hi] = grad * g2[lo:hi, None]  # float32, then rounded once by the copy
    return out.reshape(logits.shape)


def _ce_backward_fake(grad_loss, logits, target, weight, reduction, ignore_index,
                      label_smoothing, z_loss, logits_grad, target_grad, weight_grad,
                      softcap=0.0, check_labels=True):
    return (logits.new_empty(logits.shape) if logits_grad else _none(logits),
            target.new_empty(target.shape) if target_grad else _none(logits),
            weight.new_empty(weight.shape) if weight_grad else _none(logits))


CROSS_ENTROPY = define(OpSpec("cross_entropy", impl=_ce_impl, fake=_ce_fake,
                              setup_context=_ce_setup_context, backward=_ce_backward))
CROSS_ENTROPY_BACKWARD = define(OpSpec("cross_entropy_backward", impl=_ce_backward_impl,
                                       fake=_ce_backward_fake, first_order_of="cross_entropy"))


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None,
                  return_stats=False, check_labels=True, process_group=None):
    """``torch.nn.functional.cross_entropy`` on gpuce's fused kernels.

    Parameters
    ----------
    input : (N, C), (C,) or (N, C, d1, ...) float16, bfloat16, float32 or float64 tensor,
        CPU or CUDA (bfloat16 needs ml_dtypes; computed in float32)
    target : tensor
        Integer class indices of shape (N,), () or (N, d1, ...), or class probabilities
        of input's shape.
    weight, ignore_index, reduction, label_smoothing
        As torch (size_average and reduce, deprecated in torch, are mapped as torch maps
        them).
    z_loss : float, keyword only
        gpuce's extra z_loss · lse² term per row (0 = torch's loss).
    softcap : float > 0, keyword only
        Logit soft-capping (Gemma 2/3): the loss of softcap · tanh(input / softcap), its
        gradient chained through the cap, in the same fused pass (None: off).
    return_stats : bool, keyword only
        Also return a :class:`gpuce.SceStats` of tensors computed in the same pass, with no
        gradient: ``z_loss`` (the z-loss part of the loss, reduced like it; input's dtype),
        ``accuracy`` (class indices only, else None: the share of non-ignored rows whose
        class attains the row maximum, ties correct, NaN rows wrong, NaN when no row
        counts; float32, float64 for float64 input) and ``lse`` (per row of the (capped)
        logits, the loss's "none" shape, ignored rows included).  For reduction="none",
        z_loss and accuracy are per row (0 and NaN for ignored rows).
    check_labels : bool, keyword only
        False: a class index outside [0, C) other than ignore_index is not reported (no
        host sync for the check on CUDA); its row's loss and gradient are NaN.
    process_group : torch.distributed.ProcessGroup, keyword only
        Vocabulary parallelism: ``input`` holds this rank's contiguous block of the classes
        (ranks in order, blocks may be uneven), ``target`` the global class indices (or this
        rank's block of the probabilities) and ``weight`` this rank's block of the class
        weights.  Every option works; the loss (and the statistics: accuracy and predicted
        classes are global) is the unsharded call's, with the same bits on every rank, and
        the gradient is this rank's block.  One collective in the forward (an all-gather
        of 56 bytes a row from each rank), none in the backward; eager only (torch.compile
        breaks the graph there); the target and weight get no gradient and the statistics'
        lse none either.

    Returns
    -------
    Tensor, or (Tensor, SceStats) with return_stats
        The loss, in input's dtype (as torch).

    Notes
    -----
    Differentiable with respect to ``input`` and, as in torch, to a probability target
    (∂L_i/∂p_ic = −(1−ε) w_c log q_ic, reduced as the loss is) and to ``weight`` when the
    target holds probabilities (∂L_i/∂w_c = −p′_ic log q_ic, p′ the smoothed target).  A
    ``weight`` that requires grad with class-index targets raises RuntimeError, as torch's
    nll_loss does.  Double backward raises RuntimeError.  Works inside ``torch.compile``
    (the ``gpuce::cross_entropy`` operator is opaque to it).  Raises TypeError for dtypes
    gpuce lacks (float8 types, integers, ...), and for bfloat16 where ml_dtypes is missing.

    float16 and bfloat16 are computed in float32; the loss and the gradients are rounded
    once to the input's dtype (to nearest even), as torch returns them.  With
    reduction="none" the 16-bit gradient is formed in backward, each row's float32 gradient
    scaled by its incoming gradient before that one rounding.  With "mean" and "sum" the
    gradient is formed in the forward pass for an incoming gradient of 1 and multiplied by
    the incoming scalar in backward: exact for a power of two (1, a loss-scaling factor),
    one more rounding otherwise.  Under ``torch.autocast`` the call runs in float32, as
    torch's cross_entropy does there (float32 loss; the cast's backward rounds the gradient
    once).

    See Also
    --------
    torch.nn.functional.cross_entropy, gpuce.softmax_cross_entropy
    """
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("gpuce.torch.cross_entropy expects torch tensors for input and target, "
                        f"got {type(input).__name__} and {type(target).__name__}")
    _check_dtype(input, "input")
    if weight is not None:
        _check_dtype(weight, "weight")
    _check_device(input, target, weight)
    reduction = _legacy_reduction(size_average, reduce, reduction)
    check_reduction(reduction)
    prob = target.is_floating_point()
    if prob:
        _check_dtype(target, "target")
    elif target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be integer class indices or float probabilities, got {target.dtype}")
    grad_mode = torch.is_grad_enabled()
    if not prob and weight is not None and weight.requires_grad and grad_mode:
        raise RuntimeError("gpuce.torch.cross_entropy with class-index targets is not "
                           "differentiable with respect to weight (as torch's nll_loss); "
                           "pass weight.detach(), or probability targets")
    softcap, return_stats, check_labels = _llm_options(softcap, return_stats, check_labels)
    if _autocast_dtype(input) is not None:
        # as torch's autocast runs cross_entropy: in float32, whatever the autocast dtype
        # (the float32 gradient is rounded once, by the cast's backward)
        input, target, weight = (_autocast_to(v, torch.float32) for v in (input, target, weight))
    x = input.movedim(1, -1) if input.dim() >= 2 else input  # gpuce: classes last
    t = target.movedim(1, -1) if prob and target.dim() >= 2 else target
    # a 16-bit gradient for reduction="none" is formed in backward, where each row's incoming
    # gradient is known, so that it is rounded once after that scaling (_half_rows_grad)
    fused_grad = grad_mode and input.requires_grad and not (reduction == "none"
                                                            and x.dtype in _HALF)
    if process_group is not None:
        from . import _vocab

        return _vocab.cross_entropy(x, t, weight, process_group, reduction=reduction,
                                    ignore_index=int(ignore_index),
                                    label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                                    softcap=softcap or None, return_stats=return_stats,
                                    check_labels=check_labels)
    out = CROSS_ENTROPY(x, t, weight, reduction, int(ignore_index), float(label_smoothing),
                 float(z_loss), fused_grad, softcap, return_stats, check_labels)
    if not return_stats:
        return out[0]
    return out[0], _results.SceStats(out[2], None if prob else out[3], out[4], out[5])
