"""gpuce.torch.linear_cross_entropy: the ``gpuce::linear_cross_entropy`` operators (the chunked
linear model: never the N x C logits), their spec entries (implementations, fakes, autograd:
:mod:`._spec`), and torch 2.13's F.linear_cross_entropy signature (unbatched, K-dimensional
out_features, shift)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _results
from .. import linear as _linear
from ..softmax import log_softmax as _log_softmax
from .._validation import check_reduction
from ._autograd import (_capped, _llm_options, _row_scale, _soft_target_grads, _stats_fake,
                        _stats_tensors, _times_incoming)
from ._bridge import (_HALF, _acc_of, _autocast_dtype, _autocast_to, _check_device, _check_dtype,
                      _device_of, _none, _to_array, _to_tensor)
from ._ce import _lse_grad
from ._spec import OpSpec, define


# ---------------------------------------------------------------------------------------
# linear_cross_entropy
# ---------------------------------------------------------------------------------------

def _linear_grads(x, w, target, bias, ce_weight, reduction, ignore_index, label_smoothing,
                  z_loss, chunk_size, x_grad, row_scale=None, softcap=0.0,
                  return_stats=False, check_labels=True):
    """gpuce's chunked pass with return_grad: (loss, LinearGrads) arrays, and the SceStats
    last with return_stats."""
    arrays = [_to_array(v) for v in (x, w, target, bias, ce_weight, row_scale)]
    return _linear.linear_cross_entropy(
        *arrays[:3], bias=arrays[3], weight=arrays[4], grad_row_scale=arrays[5],
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, chunk_size=chunk_size, return_grad=True, input_grad=x_grad,
        softcap=softcap or None, return_stats=return_stats, check_labels=check_labels)


def _grad_tensors(grads, x, w, bias):
    """gpuce's LinearGrads as three tensors, empty where not computed."""
    return tuple(_none(x) if g is None else _to_tensor(g, like.dtype)
                 for g, like in zip(grads, (x, w, x if bias is None else bias)))


def _lce_impl(x: Tensor, w: Tensor, target: Tensor, bias: Optional[Tensor],
              ce_weight: Optional[Tensor], reduction: str, ignore_index: int,
              label_smoothing: float, z_loss: float, chunk_size: Optional[int], x_grad: bool,
              need_grad: bool, softcap: float = 0.0, return_stats: bool = False,
              check_labels: bool = True, acc_loss: bool = False
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """gpuce.linear_cross_entropy: the loss and, with need_grad (reductions "mean" and
    "sum" only), the gradients (dX only with x_grad, db only with a bias) of the loss,
    computed in the same chunked pass, then with return_stats the statistics z_loss,
    accuracy, lse (empty tensors where not computed).  The loss has x's dtype, or with
    acc_loss the accumulation dtype (float32 for 16-bit x: autocast's cross-entropy)."""
    loss_dtype = _acc_of(x.dtype) if acc_loss else x.dtype
    with _device_of(x):
        if need_grad and reduction != "none":
            out = _linear_grads(x, w, target, bias, ce_weight, reduction, ignore_index,
                                label_smoothing, z_loss, chunk_size, x_grad, None, softcap,
                                return_stats, check_labels)
            return ((_to_tensor(out[0], loss_dtype),) + _grad_tensors(out[1], x, w, bias)
                    + _stats_tensors(out[-1], x, return_stats))
        arrays = [_to_array(v) for v in (x, w, target, bias, ce_weight)]
        out = _linear.linear_cross_entropy(
            *arrays[:3], bias=arrays[3], weight=arrays[4], reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            chunk_size=chunk_size, softcap=softcap or None, return_stats=return_stats,
            check_labels=check_labels)
        loss, st = out if return_stats else (out, None)
        return ((_to_tensor(loss, loss_dtype), _none(x), _none(x), _none(x))
                + _stats_tensors(st, x, return_stats))


def _lce_fake(x, w, target, bias, ce_weight, reduction, ignore_index, label_smoothing, z_loss,
              chunk_size, x_grad, need_grad, softcap=0.0, return_stats=False,
              check_labels=True, acc_loss=False):
    check_reduction(reduction)
    loss = x.new_empty(x.shape[:1] if reduction == "none" else (),
                       dtype=_acc_of(x.dtype) if acc_loss else x.dtype)
    stats = _stats_fake(x, x.shape[:1], reduction, not target.is_floating_point(), return_stats)
    if not need_grad or reduction == "none":
        return (loss, _none(x), _none(x), _none(x)) + stats
    return (loss, x.new_empty(x.shape) if x_grad else _none(x), w.new_empty(w.shape),
            _none(x) if bias is None else bias.new_empty(bias.shape)) + stats


def _lce_setup_context(ctx, inputs, output):
    """Keeps the forward pass's gradients; the inputs only where backward runs gpuce's pass
    again (reduction="none", gradients for the target or ce_weight, or none computed)."""
    (x, w, target, bias, ce_weight, reduction, *opts, x_grad, need_grad, softcap,
     return_stats, check_labels, _acc_loss) = inputs
    need_x, need_w, need_t, need_b, need_cw = ctx.needs_input_grad[:5]
    # the gradients, the z-loss part, the accuracy and the predicted classes carry no
    # gradient; the per-row lse does
    ctx.mark_non_differentiable(*output[1:6], output[7])
    ctx.set_materialize_grads(False)  # None for an output that is not used
    ctx.loss_meta = (output[0].shape, output[0].dtype, output[0].device)
    have = need_grad and reduction != "none" and (x_grad or not need_x)
    ctx.recompute = (need_x or need_w or need_b) and not have
    # with return_stats the inputs are kept for lse's gradient (the logits formed again)
    ctx.lse_kept = return_stats and (need_x or need_w or need_b)
    keep = ctx.recompute or need_t or need_cw or ctx.lse_kept
    ctx.save_for_backward(*(output[1:4] if have else (None,) * 3),
                          *((x, w, target, bias, ce_weight) if keep else (None,) * 5))
    ctx.opts = (reduction, *opts)  # reduction, ignore_index, label_smoothing, z_loss, chunk_size
    ctx.llm = (softcap, check_labels)


def _lce_backward(ctx, grad_loss, _g_dx, _g_dw, _g_db, _g_z, _g_acc, grad_lse,
                           _g_predicted):
    d_x, d_w, d_b, x, w, target, bias, ce_weight = ctx.saved_tensors
    need_x, need_w, need_t, need_b, need_cw = ctx.needs_input_grad[:5]
    reduction, _, label_smoothing, _, chunk_size = ctx.opts
    if grad_loss is None:  # only the lse is differentiated
        d_x = d_w = d_b = d_t = d_cw = None
        need_t = need_cw = False
    elif ctx.recompute:
        d_x, d_w, d_b = LINEAR_CROSS_ENTROPY_BACKWARD(
            grad_loss, x, w, target, bias, ce_weight, *ctx.opts, need_x, *ctx.llm)
    elif need_x or need_w or need_b:
        d_x, d_w, d_b = (_times_incoming(g, grad_loss) if need else None
                         for g, need in zip((d_x, d_w, d_b), (need_x, need_w, need_b)))
    if grad_lse is not None and ctx.lse_kept and (need_x or need_w or need_b):
        extra = _linear_lse_grads(x, w, bias, grad_lse, ctx.llm[0], chunk_size)
        d_x, d_w, d_b = (g if e is None else e if g is None else (g.to(e.dtype) + e)
                         for g, e in zip((d_x, d_w, d_b), extra))
        d_x, d_w = d_x.to(x.dtype), d_w.to(w.dtype)
        d_b = None if bias is None else d_b.to(bias.dtype)
    d_t = d_cw = None
    if need_t or need_cw:
        d_t, d_cw = LINEAR_CROSS_ENTROPY_TARGET_BACKWARD(
            grad_loss, x, w, target, bias, ce_weight, reduction, label_smoothing, chunk_size,
            need_t, need_cw, ctx.llm[0])
    grads = tuple(g if need else None for g, need in zip((d_x, d_w, d_t, d_b, d_cw),
                                                         (need_x, need_w, need_t, need_b, need_cw)))
    return grads


def _linear_lse_grads(x, w, bias, grad_lse, softcap, chunk_size):
    """The gradients of Σ_i g_i lse_i (lse of the logits X Wᵀ + b) for X, W and the bias, in
    the accumulation dtype: the logits formed again chunk by chunk (rows of chunk_size, or
    about 2^22 logits a chunk), G = g_i q_ij (:func:`_lse_grad`), dX = G W, dW = Gᵀ X,
    db = Σ_i G_i.  One more pass over the chunks, in backward, only where lse is
    differentiated."""
    n, c = x.shape[0], w.shape[0]
    acc = _acc_of(x.dtype)
    wa = w.to(acc)
    d_x = torch.empty((n, x.shape[1]), dtype=acc, device=x.device)
    d_w = torch.zeros(wa.shape, dtype=acc, device=x.device)
    d_b = None if bias is None else torch.zeros(c, dtype=acc, device=x.device)
    step = chunk_size or max(1, (1 << 22) // max(c, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        xa = x[lo:hi].to(acc)
        logits = xa @ wa.t()
        if bias is not None:
            logits += bias.to(acc)
        g = _lse_grad(logits, grad_lse[lo:hi], softcap)
        d_x[lo:hi] = g @ wa
        d_w += g.t() @ xa
        if d_b is not None:
            d_b += g.sum(0)
    return d_x, d_w, d_b


def _lce_backward_impl(grad_loss: Tensor, x: Tensor, w: Tensor, target: Tensor,
                       bias: Optional[Tensor], ce_weight: Optional[Tensor], reduction: str,
                       ignore_index: int, label_smoothing: float, z_loss: float,
                       chunk_size: Optional[int], x_grad: bool, softcap: float = 0.0,
                       check_labels: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ g·L (g = grad_loss) for X (with x_grad), W and the bias (empty
    without one): gpuce's chunked pass again, each gradient row scaled by g_i
    (``grad_row_scale``) before the products for reduction="none", the result scaled by g
    for "mean" and "sum"."""
    with _device_of(x):
        scale = grad_loss.contiguous() if reduction == "none" else None
        _, grads = _linear_grads(x, w, target, bias, ce_weight, reduction, ignore_index,
                                 label_smoothing, z_loss, chunk_size, x_grad, scale, softcap,
                                 False, check_labels)
        d = _grad_tensors(grads, x, w, bias)
    if reduction != "none":
        d = tuple(g if g.numel() == 0 else _times_incoming(g, grad_loss) for g in d)
    return d


def _lce_backward_fake(grad_loss, x, w, target, bias, ce_weight, reduction, ignore_index,
                       label_smoothing, z_loss, chunk_size, x_grad, softcap=0.0,
                       check_labels=True):
    return (x.new_empty(x.shape) if x_grad else _none(x), w.new_empty(w.shape),
            _none(x) if bias is None else bias.new_empty(bias.shape))


def _lce_target_backward_impl(grad_loss: Tensor, x: Tensor, w: Tensor, target: Tensor,
                              bias: Optional[Tensor], ce_weight: Optional[Tensor], reduction: str,
                              label_smoothing: float, chunk_size: Optional[int],
                              target_grad: bool, weight_grad: bool,
                              softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """Gradients of Σ g·L for a probability target (N, C) and the class weight ce_weight (as
    in cross_entropy_backward), the logits X Wᵀ + b formed chunk by chunk (rows of
    chunk_size, or about 2^22 logits a chunk): the target gradient is the one N x C output."""
    n, c = target.shape
    acc = torch.float32 if x.dtype in _HALF else x.dtype
    d_target = target.new_empty((n, c)) if target_grad else _none(x)
    d_weight = torch.zeros(c, dtype=acc, device=x.device) if weight_grad else None
    step = chunk_size or max(1, (1 << 22) // max(c, 1))
    wt = w.to(acc).t()
    go = grad_loss.to(acc)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        logits = x[lo:hi].to(acc) @ wt
        if bias is not None:
            logits += bias.to(acc)
        logits = _capped(logits, softcap)
        with _device_of(x):
            log_q = _to_tensor(_log_softmax(_to_array(logits), axis=-1), acc)
        scale = _row_scale(go[lo:hi] if reduction == "none" else go, reduction, n)
        dt, dw = _soft_target_grads(log_q, target[lo:hi], ce_weight, scale, label_smoothing,
                                    target_grad, weight_grad)
        if dt is not None:
            d_target[lo:hi] = dt
        if dw is not None:
            d_weight += dw
    return d_target, (_none(x) if d_weight is None else d_weight.to(ce_weight.dtype))


def _lce_target_backward_fake(grad_loss, x, w, target, bias, ce_weight, reduction,
                              label_smoothing, chunk_size, target_grad, weight_grad, softcap=0.0):
    return (target.new_empty(target.shape) if target_grad else _none(x),
            ce_weight.new_empty(ce_weight.shape) if weight_grad else _none(x))


LINEAR_CROSS_ENTROPY = define(OpSpec(
    "linear_cross_entropy", impl=_lce_impl, fake=_lce_fake, setup_context=_lce_setup_context,
    backward=_lce_backward))
LINEAR_CROSS_ENTROPY_BACKWARD = define(OpSpec(
    "linear_cross_entropy_backward", impl=_lce_backward_impl, fake=_lce_backward_fake,
    first_order_of="linear_cross_entropy"))
LINEAR_CROSS_ENTROPY_TARGET_BACKWARD = define(OpSpec(
    "linear_cross_entropy_target_backward", impl=_lce_target_backward_impl,
    fake=_lce_target_backward_fake, first_order_of="linear_cross_entropy"))


def _options_ignored(options):
    """torch's ``LinearCrossEntropyOptions`` (its chunking strategy) or None: accepted and
    ignored, gpuce chooses its own chunks (``chunk_size``); anything else is a TypeError."""
    if options is not None and type(options).__name__ != "LinearCrossEntropyOptions":
        raise TypeError("options must be None or a torch.nn.LinearCrossEntropyOptions (accepted "
                        f"and ignored: gpuce chunks by chunk_size), got {type(options).__name__}")


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=None, label_smoothing=0.0, options=None,
                         z_loss=0.0, chunk_size=None, softcap=None, return_stats=False,
                         check_labels=True, shift=0, process_group=None):
    """``torch.nn.functional.linear_cross_entropy`` (torch 2.13's signature) without the
    N x C logits: ``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``.

    Parameters
    ----------
    input : (D,), (N, D) or (..., D) tensor
        The features (a language model's hidden states).  Any leading dimensions are rows
        (torch takes (D,) and (N, D)); (D,) is one unbatched row.
    linear_weight : (C, D) tensor (``nn.Linear.weight``), or (C, d1, ..., dK, D)
        A K-dimensional weight gives K-dimensional logits (N, C, d1, ..., dK), class axis
        second as in ``F.cross_entropy``; it needs a 2-D input (N, D), as torch.
    target : tensor
        Integer class indices of the loss's "none" shape (input.shape[:-1], or
        (N, d1, ..., dK)), or class probabilities of the logits' shape.
    linear_bias : (C,) or (C, d1, ..., dK) tensor, optional
    weight : (C,) tensor, optional
        The per-class weight of the cross-entropy (torch's ``weight``): any finite values,
        negative and zero included, as torch.
    reduction, label_smoothing
        As torch.
    ignore_index : int or None
        As torch: None means -100 for class indices; with probability targets it must be
        None (ValueError otherwise, where torch raises RuntimeError).
    options : torch.nn.LinearCrossEntropyOptions or None
        torch's chunking strategy: accepted and ignored (gpuce always works in chunks; set
        their size with ``chunk_size``).
    z_loss, softcap, return_stats, check_labels : keyword only
        As in :func:`cross_entropy` (the cap applies to each chunk's logits in the chunk
        buffer; the statistics' row axes are the loss's "none" shape).
    chunk_size : int, optional
        Rows per chunk (None: chosen from the free memory).
    shift : int or bool, keyword only
        Next-token prediction without copying the hidden states (Cut Cross-Entropy's
        ``shift``): with input (..., T, D) and class-index target (..., T), row t is scored
        against target[..., t + shift]; the last ``shift`` rows have no target and count as
        ignored.  True means 1.  Equal to padding ``target[..., shift:]`` with ignore_index at
        the end.  The per-row results ("none", the statistics) stay aligned with the input
        rows (Cut Cross-Entropy puts its "none" loss at the target's position instead).
    process_group : torch.distributed.ProcessGroup, keyword only
        A column-parallel head: ``linear_weight`` (C_local, D), ``linear_bias`` and
        ``weight`` are this rank's contiguous block of the classes (ranks in order, blocks
        may be uneven), ``input`` is replicated and ``target`` holds global class indices.
        Chunked as without it (never more than a chunk of local logits); the loss is the
        unsharded call's, with the same bits on every rank.  One collective in the forward
        (an all-gather of 56 bytes a row from each rank); in the backward, the local dW and
        db and one all-reduce of dX.  Eager only; class-index targets and a 2-D
        linear_weight.

    Returns
    -------
    Tensor, or (Tensor, SceStats) with return_stats
        The loss in input's dtype: a scalar, or the "none" shape for reduction="none".

    Notes
    -----
    Gradients for input, linear_weight and linear_bias are computed in the forward pass
    (one chunked pass); with reduction="none" they are recomputed in backward, chunk by
    chunk, because the per-row gradient weights are only known there.  A probability target
    and, with one, ``weight`` are differentiable as in :func:`cross_entropy` (the logits are
    formed again in backward, chunk by chunk); a ``weight`` that requires grad with
    class-index targets raises RuntimeError, as torch.  A K-dimensional linear_weight runs
    one chunked pass per position (d1, ..., dK), each through a (C, D) slice of the weight.
    Double backward raises RuntimeError.  Works inside ``torch.compile``
    (``gpuce::linear_cross_entropy`` is opaque to it).  Under ``torch.autocast`` input,
    linear_weight and linear_bias are cast to the autocast dtype (as F.linear is there,
    float64 kept) and the loss is float32 (as F.cross_entropy is there): a bfloat16 input
    with a float32 ``nn.Linear`` works as ``F.cross_entropy(F.linear(...))`` does.

    See Also
    --------
    torch.nn.functional.linear_cross_entropy, gpuce.linear_cross_entropy
    """
    for t, name in ((input, "input"), (linear_weight, "linear_weight"), (target, "target")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gpuce.torch.linear_cross_entropy expects a tensor for {name}, "
                            f"got {type(t).__name__}")
    _options_ignored(options)
    bias, ce_weight = linear_bias, weight
    cast = _autocast_dtype(input)
    if cast is not None:
        # as torch's autocast runs F.linear (its inputs cast to the autocast dtype) and then
        # F.cross_entropy (in float32): 16-bit inputs, float32 loss (gpuce keeps the logits in
        # float32 too)
        input, linear_weight, bias = (_autocast_to(v, cast) for v in (input, linear_weight, bias))
    _check_dtype(input, "input")
    _check_dtype(linear_weight, "linear_weight")
    for t, name in ((bias, "linear_bias"), (ce_weight, "weight")):
        if t is not None:
            _check_dtype(t, name)
    _check_device(input, linear_weight, target, bias, ce_weight)
    check_reduction(reduction)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"chunk_size must be an integer or None, got {type(chunk_size).__name__}")
    if input.dim() < 1:
        raise ValueError("input must have at least one dimension (features last)")
    if linear_weight.dim() < 2:
        raise ValueError(f"linear_weight must have at least 2 dimensions (C, ..., D), got "
                         f"shape {tuple(linear_weight.shape)}")
    if linear_weight.shape[-1] != input.shape[-1]:
        raise ValueError(f"input and linear_weight must have the same last dimension (the "
                         f"features), got {tuple(input.shape)} and {tuple(linear_weight.shape)}")
    c, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if bias is not None and tuple(bias.shape) != (c, *out_features):
        raise ValueError(f"linear_bias must have shape {(c, *out_features)}, got "
                         f"{tuple(bias.shape)}")
    if out_features and input.dim() != 2:
        raise ValueError(f"a K-dimensional linear_weight {tuple(linear_weight.shape)} needs a "
                         f"batched input (N, {input.shape[-1]}), got {tuple(input.shape)}")
    lead = tuple(input.shape[:-1])
    logits_shape = lead[:1] + (c,) + out_features + lead[1:]
    prob = target.is_floating_point()
    if prob:
        _check_dtype(target, "target")
        if ignore_index is not None:
            raise ValueError("ignore_index cannot be specified when target contains "
                             "probabilities (leave it None)")
    elif target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be integer class indices or float probabilities, got "
                        f"{target.dtype}")
    ignore_index = -100 if ignore_index is None else ignore_index
    shift = _shift_amount(shift, prob, out_features, input)
    grad_mode = torch.is_grad_enabled()
    if not prob and ce_weight is not None and ce_weight.requires_grad and grad_mode:
        raise RuntimeError("gpuce.torch.linear_cross_entropy with class-index targets is not "
                           "differentiable with respect to weight (as torch's nll_loss); "
                           "pass weight.detach()")
    rows_shape = lead + out_features
    want = (logits_shape if out_features else lead + (c,)) if prob else rows_shape
    if tuple(target.shape) != want:
        raise ValueError(f"target must have shape {want} (input {tuple(input.shape)}, "
                         f"linear_weight {tuple(linear_weight.shape)}), got "
                         f"{tuple(target.shape)}")
    if shift:
        target = _shifted(target, shift, ignore_index)
    softcap, return_stats, check_labels = _llm_options(softcap, return_stats, check_labels)
    opts = (int(ignore_index), float(label_smoothing), float(z_loss), chunk_size, softcap,
            return_stats, check_labels, cast is not None)
    if process_group is not None:
        if out_features or prob:
            raise ValueError("linear_cross_entropy with process_group takes a (C_local, D) "
                             "linear_weight and class-index targets")
        from . import _vocab

        return _vocab.linear_cross_entropy(
            input, linear_weight, target, bias, ce_weight, process_group, reduction=reduction,
            ignore_index=int(ignore_index), label_smoothing=float(label_smoothing),
            z_loss=float(z_loss), softcap=softcap or None, return_stats=return_stats,
            check_labels=check_labels, chunk_size=chunk_size)
    if out_features:
        return _linear_k_dim(input, linear_weight, target, bias, ce_weight, reduction, prob,
                             out_features, opts)
    return _linear_rows(input, linear_weight, target, bias, ce_weight, reduction, prob, opts)


def _shift_amount(shift, prob, out_features, input):
    """linear_cross_entropy's ``shift`` as an int, checked against the call."""
    if isinstance(shift, bool):
        shift = int(shift)
    elif not isinstance(shift, int):
        raise TypeError(f"shift must be an int or a bool, got {type(shift).__name__}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    if shift and (prob or out_features or input.dim() < 2):
        raise ValueError("shift needs class-index targets, a (C, D) linear_weight and an input "
                         f"with a sequence axis (..., T, D); got input {tuple(input.shape)}"
                         + (" and probability targets" if prob else ""))
    return shift


def _shifted(target, shift, ignore_index):
    """target[..., t + shift] at position t; ignore_index where t + shift >= T."""
    y = torch.full_like(target, ignore_index)
    t = target.shape[-1]
    if shift < t:
        y[..., :t - shift] = target[..., shift:]
    return y


def _linear_rows(input, w, target, bias, ce_weight, reduction, prob, opts):
    """linear_cross_entropy of (..., D) input and a (C, D) weight: rows input.shape[:-1]."""
    ignore_index, label_smoothing, z_loss, chunk_size, softcap, return_stats, check_labels, \
        acc_loss = opts
    lead = tuple(input.shape[:-1])
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1, target.shape[-1]) if prob else target.reshape(-1)
    need = torch.is_grad_enabled() and any(v is not None and v.requires_grad
                                           for v in (input, w, bias))
    out = LINEAR_CROSS_ENTROPY(x, w, t, bias, ce_weight, reduction, ignore_index, label_smoothing, z_loss,
                  chunk_size, need and input.requires_grad, need and reduction != "none",
                  softcap, return_stats, check_labels, acc_loss)
    loss = out[0].reshape(lead) if reduction == "none" else out[0]
    if not return_stats:
        return loss
    z, acc, lse, predicted = out[4:]
    if reduction == "none":
        z, acc = z.reshape(lead), (acc if prob else acc.reshape(lead))
    return loss, _results.SceStats(z, None if prob else acc, lse.reshape(lead), predicted.reshape(lead))


def _linear_k_dim(input, linear_weight, target, bias, ce_weight, reduction, prob, out_features,
                  opts):
    """linear_cross_entropy with a K-dimensional weight (C, d1, ..., dK, D): for each position
    j of (d1, ..., dK), the (N, C) logits input @ W[:, j]ᵀ (+ b[:, j]) by gpuce's chunked
    pass with reduction "none" and float32 rows for 16-bit input; the rows are reduced here
    as F.cross_entropy reduces its K-dimensional loss, in the accumulation dtype, and the
    result rounded once."""
    ignore_index, label_smoothing, z_loss, chunk_size, softcap, return_stats, check_labels, \
        acc_loss = opts
    n, d = input.shape
    c = linear_weight.shape[0]
    p = math.prod(out_features)
    w3 = linear_weight.reshape(c, p, d)
    b2 = None if bias is None else bias.reshape(c, p)
    t2 = target.reshape(n, c, p) if prob else target.reshape(n, p)
    acc = _acc_of(input.dtype)
    # "mean" with class weights and z-loss: the z-loss part goes over the non-ignored rows,
    # not the weight sum; its terms are formed from the (differentiable) per-row lse
    z_apart = bool(z_loss) and ce_weight is not None and reduction == "mean" and not prob
    stats = return_stats or z_apart
    rows, zs, accs, lses, preds = [], [], [], [], []
    for j in range(p):
        tj = t2[:, :, j] if prob else t2[:, j]
        out = _linear_rows(input, w3[:, j], tj, None if b2 is None else b2[:, j], ce_weight,
                           "none", prob, (ignore_index, label_smoothing, z_loss, chunk_size,
                                          softcap, stats, check_labels, True))
        loss_j, st = out if stats else (out, None)
        rows.append(loss_j.to(acc))
        if st is not None:
            zs.append(st.z_loss.to(acc))
            lses.append(st.lse)
            preds.append(st.predicted)
            if not prob:
                accs.append(st.accuracy)
    loss_dtype = acc if acc_loss else input.dtype
    rows = torch.stack(rows, -1)  # (N, P)
    shape = (n,) + out_features
    if reduction == "none":
        loss = rows.reshape(shape).to(loss_dtype)
    else:
        total = rows.sum()
        denom = _k_dim_denominator(t2, ce_weight, ignore_index, prob, acc) \
            if reduction == "mean" else None
        if z_apart:  # Σ z·lse² over the non-ignored rows, by their count (not the weight sum)
            active = t2 != ignore_index
            z_sum = z_loss * torch.where(active, torch.stack(lses, -1) ** 2, 0.0).sum()
            mean = _mean(total - z_sum, denom) + _mean(z_sum, active.sum().to(acc))
            loss = torch.where(denom == 0, torch.zeros_like(mean), mean).to(loss_dtype)
        else:
            loss = (total if denom is None else _mean(total, denom)).to(loss_dtype)
    if not return_stats:
        return loss
    lse = torch.stack(lses, -1).reshape(shape)
    predicted = torch.stack(preds, -1).reshape(shape)
    z = torch.stack(zs, -1)
    accuracy = None if prob else torch.stack(accs, -1)
    if reduction == "none":
        return loss, _results.SceStats(z.reshape(shape).to(loss_dtype),
                                 None if prob else accuracy.reshape(shape), lse, predicted)
    z = z.sum()
    if reduction == "mean":
        counted = (t2 != ignore_index).sum().to(acc) if not prob else torch.tensor(
            float(n * p), dtype=acc, device=input.device)
        z = _mean(z, counted)
    if accuracy is not None:
        accuracy = accuracy.nanmean() if bool((~accuracy.isnan()).any()) else \
            accuracy.new_tensor(float("nan"))
    return loss, _results.SceStats(z.to(loss_dtype).detach(), accuracy, lse, predicted)


def _k_dim_denominator(t2, ce_weight, ignore_index, prob, acc):
    """The mean's denominator of the K-dimensional loss: the weight sum of the non-ignored
    labels (their count without weights), or the number of rows for probability targets."""
    if prob:
        return torch.tensor(float(t2.shape[0] * t2.shape[2]), dtype=acc, device=t2.device)
    c = ce_weight.shape[0] if ce_weight is not None else None
    active = t2 != ignore_index
    if ce_weight is None:
        return active.sum().to(acc)
    valid = active & (t2 >= 0) & (t2 < c)
    return torch.where(valid, ce_weight.to(acc)[torch.where(valid, t2, 0)], 0).sum()


def _mean(total, denom):
    """total / denom under gpuce's zero-denominator rule (0 where the denominator is 0)."""
    return torch.where(denom == 0, torch.zeros_like(total), total / torch.where(
        denom == 0, torch.ones_like(denom), denom))
