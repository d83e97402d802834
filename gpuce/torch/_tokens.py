"""gpuce.torch.token_logprobs and linear_token_logprobs: the ``gpuce::token_logprobs`` and
``gpuce::linear_token_logprobs`` operators (each token's log-probability and the softmax's
entropy, at a temperature, from logits or straight from hidden states), their backward
operators, their spec entries (:mod:`._spec`) and the public functions.

Both outputs are differentiable.  The forward keeps its inputs (the logits, or x, W and the
bias: never the linear form's logits); the backward operator takes the incoming row gradients
(g_logp, g_H) and forms, in one pass over the logits (a chunk of them at a time for the linear
form, formed again by the GEMM), G = ∂(Σ g_logp log p + g_H H)/∂f, then dX = G W, dW = Gᵀ X,
db = 1ᵀ G (:mod:`gpuce.tokens`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _validation as _V
from ..tokens import linear_token_logprobs as _linear_token_logprobs
from ..tokens import token_logprobs as _token_logprobs
from ._bridge import (_acc_of, _autocast_dtype, _autocast_to, _check_device, _check_dtype,
                      _device_of, _none, _to_array, _to_tensor)
from ._spec import OpSpec, define


def _rows_out(out, like, return_entropy):
    """(log p, entropy) tensors in the accumulation dtype from the array function's result."""
    acc = _acc_of(like.dtype)
    logp, entropy = out if return_entropy else (out, None)
    return _to_tensor(logp, acc), (_none(like) if entropy is None else _to_tensor(entropy, acc))


def _rows_fake(like, lead, return_entropy):
    acc = _acc_of(like.dtype)
    return (like.new_empty(tuple(lead), dtype=acc),
            like.new_empty(tuple(lead), dtype=acc) if return_entropy else _none(like))


def _incoming(grad_logp, grad_entropy):
    """The incoming row gradients as arrays (None for an output not used)."""
    return _to_array(grad_logp), _to_array(grad_entropy)


# ---------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------

def _tok_impl(logits: Tensor, target: Tensor, temperature: float, softcap: float,
              ignore_index: int, return_entropy: bool) -> tuple[Tensor, Tensor]:
    """gpuce.token_logprobs on (..., C) logits: log p and, with return_entropy, H (else
    empty), per row, in the accumulation dtype."""
    with _device_of(logits):
        out = _token_logprobs(_to_array(logits), _to_array(target), temperature=temperature,
                              return_entropy=return_entropy, softcap=softcap or None,
                              ignore_index=ignore_index)
        return _rows_out(out, logits, return_entropy)


def _tok_fake(logits, target, temperature, softcap, ignore_index, return_entropy):
    return _rows_fake(logits, logits.shape[:-1], return_entropy)


def _tok_setup_context(ctx, inputs, output):
    logits, target, temperature, softcap, ignore_index, return_entropy = inputs
    ctx.set_materialize_grads(False)  # None for an output that is not used
    ctx.save_for_backward(logits, target)
    ctx.opts = (temperature, softcap, ignore_index)
    ctx.return_entropy = return_entropy


def _tok_backward(ctx, grad_logp, grad_entropy):
    if not ctx.return_entropy:  # the empty placeholder's gradient
        grad_entropy = None
    if not ctx.needs_input_grad[0] or (grad_logp is None and grad_entropy is None):
        return (None,)
    logits, target = ctx.saved_tensors
    return (TOKEN_LOGPROBS_BACKWARD(grad_logp, grad_entropy, logits, target, *ctx.opts),)


def _tok_backward_impl(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                       logits: Tensor, target: Tensor, temperature: float, softcap: float,
                       ignore_index: int) -> Tensor:
    """∂(Σ g_logp log p + g_H H)/∂logits (None: 0), in the logits' dtype, rounded once from
    the accumulation dtype."""
    with _device_of(logits):
        g_logp, g_entropy = _incoming(grad_logp, grad_entropy)
        out = _token_logprobs(_to_array(logits), _to_array(target), temperature=temperature,
                              softcap=softcap or None, ignore_index=ignore_index,
                              return_grad=True, grad_logprobs=g_logp, grad_entropy=g_entropy,
                              _labels_checked=True)  # checked by the forward: no sync
        return _to_tensor(out[-1], logits.dtype)


def _tok_backward_fake(grad_logp, grad_entropy, logits, target, temperature, softcap,
                       ignore_index):
    return logits.new_empty(logits.shape)


TOKEN_LOGPROBS = define(OpSpec("token_logprobs", impl=_tok_impl, fake=_tok_fake,
                               setup_context=_tok_setup_context, backward=_tok_backward))
TOKEN_LOGPROBS_BACKWARD = define(OpSpec("token_logprobs_backward", impl=_tok_backward_impl,
                                        fake=_tok_backward_fake,
                                        first_order_of="token_logprobs"))


# ---------------------------------------------------------------------------------------
# linear_token_logprobs
# ---------------------------------------------------------------------------------------

def _ltok_impl(x: Tensor, w: Tensor, target: Tensor, bias: Optional[Tensor],
               temperature: float, softcap: float, ignore_index: int, return_entropy: bool,
               chunk_size: Optional[int]) -> tuple[Tensor, Tensor]:
    """gpuce.linear_token_logprobs on (N, D) x: log p and, with return_entropy, H (else
    empty), per row, in the accumulation dtype; never the N x C logits."""
    with _device_of(x):
        out = _linear_token_logprobs(
            _to_array(x), _to_array(w), _to_array(target), bias=_to_array(bias),
            temperature=temperature, return_entropy=return_entropy, softcap=softcap or None,
            ignore_index=ignore_index, chunk_size=chunk_size)
        return _rows_out(out, x, return_entropy)


def _ltok_fake(x, w, target, bias, temperature, softcap, ignore_index, return_entropy,
               chunk_size):
    return _rows_fake(x, x.shape[:1], return_entropy)


def _ltok_setup_context(ctx, inputs, output):
    x, w, target, bias, temperature, softcap, ignore_index, return_entropy, chunk_size = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w, target, bias)
    ctx.opts = (temperature, softcap, ignore_index, chunk_size)
    ctx.return_entropy = return_entropy


def _ltok_backward(ctx, grad_logp, grad_entropy):
    if not ctx.return_entropy:  # the empty placeholder's gradient
        grad_entropy = None
    need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
    if not (need_x or need_w or need_b) or (grad_logp is None and grad_entropy is None):
        return (None, None, None, None)
    x, w, target, bias = ctx.saved_tensors
    d_x, d_w, d_b = LINEAR_TOKEN_LOGPROBS_BACKWARD(grad_logp, grad_entropy, x, w, target, bias,
                                                   *ctx.opts, need_x)
    return (d_x if need_x else None, d_w if need_w else None, None,
            d_b if need_b else None)


def _ltok_backward_impl(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                        x: Tensor, w: Tensor, target: Tensor, bias: Optional[Tensor],
                        temperature: float, softcap: float, ignore_index: int,
                        chunk_size: Optional[int], x_grad: bool
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """dX (only with x_grad, else empty), dW and db (empty without a bias) of
    Σ g_logp log p + g_H H: gpuce's chunked pass again, the chunk's G formed in place of its
    logits; 16-bit dW accumulated in float32 and rounded once."""
    with _device_of(x):
        g_logp, g_entropy = _incoming(grad_logp, grad_entropy)
        out = _linear_token_logprobs(
            _to_array(x), _to_array(w), _to_array(target), bias=_to_array(bias),
            temperature=temperature, softcap=softcap or None, ignore_index=ignore_index,
            chunk_size=chunk_size, return_grad=True, input_grad=x_grad,
            grad_logprobs=g_logp, grad_entropy=g_entropy, check_finite=False,
            _labels_checked=True)
        grads = out[-1]
        return (_none(x) if grads.X is None else _to_tensor(grads.X, x.dtype),
                _to_tensor(grads.W, w.dtype),
                _none(x) if grads.bias is None else _to_tensor(grads.bias, bias.dtype))


def _ltok_backward_fake(grad_logp, grad_entropy, x, w, target, bias, temperature, softcap,
                        ignore_index, chunk_size, x_grad):
    return (x.new_empty(x.shape) if x_grad else _none(x), w.new_empty(w.shape),
            _none(x) if bias is None else bias.new_empty(bias.shape))


LINEAR_TOKEN_LOGPROBS = define(OpSpec("linear_token_logprobs", impl=_ltok_impl, fake=_ltok_fake,
                                      setup_context=_ltok_setup_context,
                                      backward=_ltok_backward))
LINEAR_TOKEN_LOGPROBS_BACKWARD = define(OpSpec(
    "linear_token_logprobs_backward", impl=_ltok_backward_impl, fake=_ltok_backward_fake,
    first_order_of="linear_token_logprobs"))


# ---------------------------------------------------------------------------------------
# the public functions
# ---------------------------------------------------------------------------------------

def _options(temperature, softcap, ignore_index, return_entropy):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return (_V.check_temperature(temperature), _V.check_softcap(softcap), int(ignore_index),
            _V.check_flag(return_entropy, "return_entropy"))


def _check_target(target, lead):
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch tensor of token ids, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must be integer token ids, got {target.dtype}")
    if tuple(target.shape) != tuple(lead):
        raise ValueError(f"target must have the rows' shape {tuple(lead)}, got {tuple(target.shape)}")


def _result(out, return_entropy):
    return (out[0], out[1]) if return_entropy else out[0]


def token_logprobs(logits, target, *, temperature=1.0, return_entropy=False, softcap=None,
                   ignore_index=-100, process_group=None):
    r"""Each token's log-probability under softmax(logits / temperature) and, with
    ``return_entropy``, the entropy of that softmax, per row: gpuce's rows as a torch
    operator, both outputs differentiable.

    ``log p_i = u_{i,k_i} − logsumexp(u_i)`` and ``H_i = logsumexp(u_i) − Σ_j q_ij u_ij``
    with ``u_i = cap(f_i) / temperature`` (``cap(f) = s tanh(f / s)`` with ``softcap`` s,
    applied before the temperature) and ``q_i = softmax(u_i)``.  Equal, to rounding, to
    ``log_softmax(f / τ).gather(-1, k)`` and ``-(softmax · log_softmax).sum(-1)``, without a
    second N x C tensor.

    Parameters
    ----------
    logits : (..., C) float16, bfloat16, float32 or float64 tensor, CPU or CUDA
    target : (...) integer tensor
        Each row's token, in [0, C) or equal to ``ignore_index`` (anything else raises
        ValueError before any work).
    temperature : float > 0, finite
    return_entropy : bool
    softcap : float > 0, optional
    ignore_index : int
        Rows whose token equals it give log p = 0 and H = 0, and no gradient.
    process_group : torch.distributed.ProcessGroup, keyword only
        Vocabulary parallelism: ``logits`` holds this rank's contiguous block of the classes
        (blocks in rank order, sizes may differ) and ``target`` the global token ids, the same
        on every rank.  One all-gather of 32 bytes a row from each rank in the forward (the
        rows' partial statistics, combined in rank order: the same bits on every rank), none
        in the backward, which returns this rank's gradient block.  Eager only
        (``torch.compile`` breaks the graph around it); the default process group is
        ``torch.distributed.group.WORLD``.

    Returns
    -------
    logp, or (logp, entropy)
        Of the rows' shape (...), float32 for 16-bit and float32 logits (float64 for
        float64).  A row whose (capped, tempered) maximum is not finite gives NaN.

    Notes
    -----
    The backward takes the incoming row gradients (g_logp, g_H) and forms
    ``(g_logp (onehot − q) − g_H q (log q + H)) / τ`` (through the cap) in one pass over
    the logits, kept from the forward; the gradient comes back in the logits' dtype, rounded
    once.  Double backward raises RuntimeError.  Works inside ``torch.compile``
    (``fullgraph=True``: the operators are opaque to it).  Under ``torch.autocast`` the call
    runs in float32, as torch's log_softmax does there.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch tensor, got {type(logits).__name__}")
    _check_dtype(logits, "logits")
    if logits.dim() < 1:
        raise ValueError("logits must have a class axis (at least 1-D)")
    _check_target(target, logits.shape[:-1])
    _check_device(logits, target)
    temperature, softcap, ignore_index, return_entropy = _options(temperature, softcap,
                                                                  ignore_index, return_entropy)
    if _autocast_dtype(logits) is not None:
        logits = _autocast_to(logits, torch.float32)
    if process_group is not None:
        from . import _vocab

        return _vocab.token_logprobs(logits, target, process_group, temperature=temperature,
                                     softcap=softcap, ignore_index=ignore_index,
                                     return_entropy=return_entropy)
    out = TOKEN_LOGPROBS(logits, target, temperature, softcap, ignore_index, return_entropy)
    return _result(out, return_entropy)


def linear_token_logprobs(input, weight, target, *, bias=None, temperature=1.0,
                          return_entropy=False, softcap=None, ignore_index=-100,
                          chunk_size=None, process_group=None):
    r""":func:`token_logprobs` of the logits ``input @ weight.T (+ bias)``, straight from the
    hidden states: the logits are formed a chunk of rows at a time (forward and backward) and
    never exist whole.

    Parameters
    ----------
    input : (..., D) tensor (hidden states);  weight : (C, D) of input's dtype (the LM head)
    target : (...) integer tensor, input's leading shape
    bias : (C,) tensor, optional
    temperature, return_entropy, softcap, ignore_index
        As :func:`token_logprobs`.
    chunk_size : int, optional
        Rows a chunk (chosen from the problem and free memory when None).
    process_group : torch.distributed.ProcessGroup, keyword only
        A column-parallel head: ``weight`` (C_r, D) and ``bias`` are this rank's rows (blocks
        in rank order), ``input`` and ``target`` the same on every rank.  One all-gather of 32
        bytes a row from each rank forward; backward, dW and db of the rank's rows locally and
        one all-reduce of dX.  Eager only.

    Returns
    -------
    logp, or (logp, entropy), of the leading shape (...): float32 for 16-bit and float32
    input (float64 for float64).

    Notes
    -----
    Differentiable with respect to ``input``, ``weight`` and ``bias``: the backward forms the
    chunks' logits again, their G = ∂/∂f in place, then dX = G W, dW = Gᵀ X and db = 1ᵀ G
    (16-bit: GEMMs with 16-bit inputs, float32 accumulation, dW rounded once).  Under
    ``torch.autocast`` input, weight and bias are cast to autocast's dtype first, as
    ``F.linear`` casts them.  Double backward raises RuntimeError; works inside
    ``torch.compile``.
    """
    for t, name in ((input, "input"), (weight, "weight")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}")
        _check_dtype(t, name)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch tensor or None, got {type(bias).__name__}")
        _check_dtype(bias, "bias")
    if input.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"input must be (..., D) and weight (C, D), got {tuple(input.shape)} "
                         f"and {tuple(weight.shape)}")
    lead = input.shape[:-1]
    _check_target(target, lead)
    _check_device(input, weight, target, bias)
    temperature, softcap, ignore_index, return_entropy = _options(temperature, softcap,
                                                                  ignore_index, return_entropy)
    chunk_size = _V.check_chunk_size(chunk_size)
    dt = _autocast_dtype(input)
    if dt is not None:
        input, weight, bias = (_autocast_to(v, dt) for v in (input, weight, bias))
    x2 = input.reshape(-1, input.shape[-1])
    if process_group is not None:
        from . import _vocab

        out = _vocab.linear_token_logprobs(x2, weight, target.reshape(-1), bias, process_group,
                                           temperature=temperature, softcap=softcap,
                                           ignore_index=ignore_index, return_entropy=True,
                                           chunk_size=chunk_size)
        logp = out[0].reshape(lead)
        return (logp, out[1].reshape(lead)) if return_entropy else logp
    out = LINEAR_TOKEN_LOGPROBS(x2, weight, target.reshape(-1), bias, temperature, softcap,
                                ignore_index, return_entropy, chunk_size)
    logp = out[0].reshape(lead)
    return (logp, out[1].reshape(lead)) if return_entropy else logp
