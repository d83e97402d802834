"""torch adapter: gpuce's kernels as torch custom operators (``torch.library.custom_op``).

``gpuce.torch.cross_entropy`` is a drop-in for ``torch.nn.functional.cross_entropy`` (same
arguments, class axis 1, integer or probability targets, the same loss dtype) and
``gpuce.torch.linear_cross_entropy`` is a drop-in for torch 2.13's
``torch.nn.functional.linear_cross_entropy`` (same arguments) that never materialises the
N x C logits (gpuce's chunked linear model).  Tensors cross without copies: CUDA tensors
become CuPy arrays through DLPack (the GPU kernels, on torch's current stream), CPU tensors
become NumPy arrays (the NumPy path).  bfloat16 crosses without a copy too: NumPy has no
bfloat16 of its own, so a CPU tensor's int16 view becomes a NumPy array reinterpreted as
``ml_dtypes.bfloat16`` (and results go back the same way); a CUDA one goes through DLPack
where CuPy takes bfloat16 there, else through the same int16 view.

The work is done by five operators in the ``gpuce`` namespace, each with a fake (meta)
implementation giving its outputs' shapes and dtypes, so that ``torch.compile`` treats them
as opaque calls (``fullgraph=True`` traces without a break; nothing of the NumPy/CuPy code is
traced)::

    gpuce::cross_entropy(Tensor logits, Tensor target, Tensor? weight, str reduction,
        SymInt ignore_index, float label_smoothing, float z_loss, bool input_grad,
        float softcap=0., bool return_stats=False, bool check_labels=True)
        -> (Tensor loss, Tensor grad, Tensor z_loss, Tensor accuracy, Tensor lse,
            Tensor predicted)
    gpuce::cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target,
        Tensor? weight, str reduction, SymInt ignore_index, float label_smoothing,
        float z_loss, bool input_grad, bool target_grad, bool weight_grad,
        float softcap=0., bool check_labels=True)
        -> (Tensor d_logits, Tensor d_target, Tensor d_weight)
    gpuce::linear_cross_entropy(Tensor x, Tensor w, Tensor target, Tensor? bias,
        Tensor? ce_weight, str reduction, SymInt ignore_index, float label_smoothing,
        float z_loss, SymInt? chunk_size, bool input_grad, bool need_grad,
        float softcap=0., bool return_stats=False, bool check_labels=True)
        -> (Tensor loss, Tensor d_x, Tensor d_w, Tensor d_b, Tensor z_loss, Tensor accuracy,
            Tensor lse, Tensor predicted)
    gpuce::linear_cross_entropy_backward(Tensor grad_loss, Tensor x, Tensor w, Tensor target,
        Tensor? bias, Tensor? ce_weight, str reduction, SymInt ignore_index,
        float label_smoothing, float z_loss, SymInt? chunk_size, bool input_grad,
        float softcap=0., bool check_labels=True)
        -> (Tensor d_x, Tensor d_w, Tensor d_b)
    gpuce::linear_cross_entropy_target_backward(Tensor grad_loss, Tensor x, Tensor w,
        Tensor target, Tensor? bias, Tensor? ce_weight, str reduction, float label_smoothing,
        SymInt? chunk_size, bool target_grad, bool weight_grad, float softcap=0.)
        -> (Tensor d_target, Tensor d_ce_weight)

The LLM-head options (softcap, 0. for none; return_stats; check_labels) come last, with
defaults.  The statistics (z-loss part, token accuracy, per-row lse: gpuce.SceStats) are
outputs of the forward operators, empty tensors unless return_stats.  z_loss and accuracy
carry no gradient (marked non-differentiable); lse is differentiable, ∂lse_i/∂f_ij = q_ij
(through the cap), formed in backward from the logits (kept for it with return_stats; the
linear operator forms each chunk's logits again) and added to the loss's gradient, so that
``loss + z * (lse ** 2).mean()`` trains.

The forward operators take the class axis last.  With a ``True`` grad flag they compute the
gradient of the returned loss in the same fused pass and return it beside the loss (an empty
tensor stands for "not computed"); the autograd formula (``register_autograd``) keeps only
that gradient and, in backward, scales it by the incoming gradient.  The ``*_backward``
operators run where more is needed, and only then are the inputs kept for backward:
``reduction="none"`` in the linear version (gpuce's chunked pass again, each row scaled by
its incoming gradient), a forward pass that computed no gradient, and gradients for a
probability target or the class weight (from log q, gpuce.log_softmax of the logits, formed
again).  They are opaque to the compiler too.  Gradients returned under
``create_graph=True`` raise ``RuntimeError`` when differentiated again: gpuce has no double
backward.

torch is an optional dependency: import this module only where torch is installed.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import _results
from . import _validation as _V
from . import linear as _linear
from ._backend import is_cupy_array
from ._validation import bfloat16_dtype
from .sce import softmax_cross_entropy as _sce
from .softmax import log_softmax as _log_softmax

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# the dtypes computed in float32 (their loss comes back in their own dtype, as torch's)
_HALF = (torch.float16, torch.bfloat16)
REDUCTIONS = ("none", "sum", "mean")
_NO_DOUBLE_BACKWARD = (
    "gpuce.torch: double backward (differentiating {name}'s gradient again, e.g. after "
    "torch.autograd.grad(..., create_graph=True)) is not supported; use "
    "torch.nn.functional.cross_entropy where second derivatives are needed")


def _check_dtype(t, name):
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"gpuce.torch: {name} has dtype {t.dtype}, which gpuce does not support; supported: "
            "torch.float16, torch.bfloat16, torch.float32, torch.float64 (cast with .float() "
            "first)")
    if t.dtype == torch.bfloat16:
        _bf16()


def _bf16():
    """NumPy's bfloat16 dtype (ml_dtypes'), or TypeError naming the package to install."""
    dt = bfloat16_dtype()
    if dt is None:
        raise TypeError("gpuce.torch: torch.bfloat16 tensors need the ml_dtypes package "
                        "(NumPy's and CuPy's bfloat16); install it: pip install ml_dtypes")
    return dt


def _cupy_bf16(t):
    """A CUDA bfloat16 tensor as a CuPy bfloat16 array on the same memory: through DLPack
    where this CuPy takes bfloat16 there, else its int16 view reinterpreted (same bits)."""
    import cupy

    try:
        return cupy.from_dlpack(t)
    except (TypeError, ValueError, BufferError, RuntimeError):
        return cupy.from_dlpack(t.view(torch.int16)).view(_bf16())


def _check_device(*tensors):
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"gpuce.torch: all tensors must be on one device, got {sorted(map(str, devs))}")
    for d in devs:
        if d.type not in ("cpu", "cuda"):
            raise TypeError(f"gpuce.torch supports CPU and CUDA tensors, got device {d}")


def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; "
                         f"got {reduction!r}")


def _to_array(t):
    """The tensor's data as a CuPy (CUDA) or NumPy (CPU) array, sharing memory."""
    if t is None:
        return None
    t = t.detach()
    if t.is_cuda:
        if t.dtype == torch.bfloat16:
            return _cupy_bf16(t)
        import cupy

        return cupy.from_dlpack(t)
    if t.dtype == torch.bfloat16:
        # NumPy has no bfloat16 of its own (np.from_dlpack and Tensor.numpy refuse it): the
        # same-size int16 view's array, reinterpreted as ml_dtypes.bfloat16 (no copy)
        return t.resolve_neg().view(torch.int16).numpy().view(_bf16())
    return t.resolve_conj().resolve_neg().numpy()


def _to_tensor(a, dtype=None):
    """An array returned by gpuce as a C-contiguous tensor on its device (no copy where the
    array already is one): the fake implementations promise contiguous outputs."""
    if is_cupy_array(a):
        if a.dtype.name == "bfloat16":
            try:
                t = torch.from_dlpack(a)
            except (TypeError, ValueError, BufferError, RuntimeError):
                t = torch.from_dlpack(a.view("int16")).view(torch.bfloat16)
        else:
            t = torch.from_dlpack(a)
    else:
        a = np.asarray(a)
        a = a if a.flags.c_contiguous else a.copy()
        if a.dtype.name == "bfloat16":  # torch.from_numpy refuses ml_dtypes: the int16 view
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
    t = t.contiguous()
    return t if dtype is None else t.to(dtype)


def _none(like):
    """The empty tensor that stands for "not computed" in an operator's outputs."""
    return like.new_empty((0,))


def _acc_of(dtype):
    """The accumulation dtype of an input dtype (float32 for the 16-bit ones)."""
    return torch.float32 if dtype in _HALF else dtype


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
    return _V.check_softcap(softcap), _V._flag(return_stats, "return_stats"), \
        _V._flag(check_labels, "check_labels")


def _capped(logits, softcap):
    """softcap · tanh(logits / softcap) as a new tensor (for the backward operators that form
    log q again), or the logits themselves."""
    return logits if not softcap else torch.tanh(logits / softcap) * softcap


def _autocast_dtype(t):
    """The dtype torch.autocast casts to on t's device, or None where autocast is off there
    (or t is not on a CPU or CUDA device)."""
    dev = t.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _autocast_to(t, dtype):
    """A floating tensor cast as autocast casts it (float64 kept, as torch's autocast keeps it),
    anything else (None, integer class indices) as it is."""
    if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


@contextlib.contextmanager
def _device_of(t):
    """For a CUDA tensor: CuPy on its device and on torch's current stream there, so that
    gpuce's kernels are ordered with the torch work around them (no extra sync)."""
    if not t.is_cuda:
        yield
        return
    import cupy

    with cupy.cuda.Device(t.device.index):
        ptr = torch.cuda.current_stream(t.device).cuda_stream
        if ptr == 0:  # torch's default stream is the legacy null stream, CuPy's default too
            yield
            return
        with cupy.cuda.ExternalStream(ptr):
            yield


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


def _soft_target_grads(log_q, target, weight, scale, label_smoothing, target_grad, weight_grad):
    """With A_ic = −log q_ic · s_i: ∂/∂p_ic = (1−ε) w_c A_ic and ∂/∂w_c = Σ_i p′_ic A_ic
    (p′ = (1−ε) p + ε/C), each None where not asked for.  log_q: (..., C), scale: s_i."""
    c = log_q.shape[-1]
    a = -log_q * scale
    d_target = d_weight = None
    if target_grad:
        d_target = a * (1.0 - label_smoothing)
        if weight is not None:
            d_target = d_target * weight.to(a.dtype)
    if weight_grad:
        p = target.to(a.dtype) * (1.0 - label_smoothing) + label_smoothing / c
        d_weight = (p * a).reshape(-1, c).sum(0)
    return d_target, d_weight


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


def _raise_double_backward(name):
    def backward(ctx, *grads):
        raise RuntimeError(_NO_DOUBLE_BACKWARD.format(name=name))
    return backward


# ---------------------------------------------------------------------------------------
# cross_entropy
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("gpuce::cross_entropy", mutates_args=(), device_types=("cpu", "cuda"))
def _ce_op(logits: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str,
           ignore_index: int, label_smoothing: float, z_loss: float,
           input_grad: bool, softcap: float = 0.0, return_stats: bool = False,
           check_labels: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """gpuce.softmax_cross_entropy on (..., C) logits: the loss (logits' dtype), with
    input_grad the gradient of the loss with respect to the logits (else empty), and with
    return_stats the statistics z_loss, accuracy, lse (else empty)."""
    with _device_of(logits):
        out = _sce(_to_array(logits), _to_array(target), weight=_to_array(weight),
                   reduction=reduction, ignore_index=ignore_index,
                   label_smoothing=label_smoothing, z_loss=z_loss, return_grad=input_grad,
                   softcap=softcap or None, return_stats=return_stats,
                   check_labels=check_labels)
        out = out if isinstance(out, tuple) else (out,)
        loss, grad = out[0], (out[1] if input_grad else None)
        return (_to_tensor(loss, logits.dtype),
                _none(logits) if grad is None else _to_tensor(grad, logits.dtype),
                *_stats_tensors(out[-1], logits, return_stats))


@_ce_op.register_fake
def _ce_fake(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, input_grad,
             softcap=0.0, return_stats=False, check_labels=True):
    _check_reduction(reduction)
    shape = logits.shape[:-1] if reduction == "none" else ()
    return (logits.new_empty(shape),
            logits.new_empty(logits.shape) if input_grad else _none(logits),
            *_stats_fake(logits, logits.shape[:-1], reduction, not target.is_floating_point(),
                         return_stats))


def _ce_setup_context(ctx, inputs, output):
    """Keeps the forward pass's gradient; the logits and the target only where backward
    needs them (gradients for the target or the weight, or no gradient computed forward),
    so that the N x C logits are not held until backward for nothing."""
    (logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, input_grad,
     softcap, return_stats, check_labels) = inputs
    need_x, need_t, need_w = ctx.needs_input_grad[:3]
    # the gradient, the z-loss part, the accuracy and the predicted classes carry no gradient;
    # the per-row lse does
    ctx.mark_non_differentiable(*output[1:4], output[5])
    ctx.set_materialize_grads(False)  # None for an output that is not used
    ctx.recompute = need_x and not input_grad
    # with return_stats the logits are kept for lse's gradient (softmax of the logits)
    ctx.lse_kept = need_x and return_stats  # lse computed (else an empty placeholder)
    keep = ctx.recompute or need_t or need_w or ctx.lse_kept
    ctx.save_for_backward(output[1] if input_grad else None, *((logits, target, weight) if keep
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


def _ce_autograd_backward(ctx, grad_loss, _g_grad, _g_z, _g_acc, grad_lse, _g_predicted):
    grad, logits, target, weight = ctx.saved_tensors
    need_x, need_t, need_w = ctx.needs_input_grad[:3]
    reduction = ctx.opts[0]
    d_x = d_t = d_w = None
    if grad_loss is None:  # only the lse is differentiated
        grad_loss = _zero_incoming(ctx)
    if need_x and not ctx.recompute:
        d_x = _times_incoming(grad, grad_loss, reduction == "none")
    if ctx.recompute or need_t or need_w:
        d = torch.ops.gpuce.cross_entropy_backward(grad_loss, logits, target, weight, *ctx.opts,
                                                   ctx.recompute, need_t, need_w, *ctx.llm)
        d_x = d[0] if ctx.recompute else d_x
        d_t, d_w = (d[1] if need_t else None), (d[2] if need_w else None)
    if need_x and grad_lse is not None and ctx.lse_kept:
        d_lse = _lse_grad(logits, grad_lse, ctx.llm[0])
        d_x = (d_lse if d_x is None else d_x.to(d_lse.dtype) + d_lse).to(logits.dtype)
    return _first_order_only("cross_entropy", (d_x, d_t, d_w)) + (None,) * 8


_ce_op.register_autograd(_ce_autograd_backward, setup_context=_ce_setup_context)


@torch.library.custom_op("gpuce::cross_entropy_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _ce_backward_op(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                    reduction: str, ignore_index: int, label_smoothing: float, z_loss: float,
                    input_grad: bool, target_grad: bool, weight_grad: bool,
                    softcap: float = 0.0,
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
    if input_grad and reduction == "none" and logits.dtype in _HALF:
        d_input = _half_rows_grad(grad_loss, logits, target, weight, ignore_index,
                                  label_smoothing, z_loss, softcap, check_labels)
    elif input_grad:
        grad = _ce_op(logits, target, weight, reduction, ignore_index, label_smoothing,
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
        grad = _ce_op(x2[lo:hi].to(torch.float32), t2[lo:hi], weight, "none", ignore_index,
                      label_smoothing, z_loss, True, softcap, False, check_labels)[1]
        out[lo:hi] = grad * g2[lo:hi, None]  # float32, then rounded once by the copy
    return out.reshape(logits.shape)


@_ce_backward_op.register_fake
def _ce_backward_fake(grad_loss, logits, target, weight, reduction, ignore_index,
                      label_smoothing, z_loss, input_grad, target_grad, weight_grad,
                      softcap=0.0, check_labels=True):
    return (logits.new_empty(logits.shape) if input_grad else _none(logits),
            target.new_empty(target.shape) if target_grad else _none(logits),
            weight.new_empty(weight.shape) if weight_grad else _none(logits))


_ce_backward_op.register_autograd(_raise_double_backward("cross_entropy"))


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None,
                  return_stats=False, check_labels=True):
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
    _check_reduction(reduction)
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
    out = _ce_op(x, t, weight, reduction, int(ignore_index), float(label_smoothing),
                 float(z_loss), fused_grad, softcap, return_stats, check_labels)
    if not return_stats:
        return out[0]
    return out[0], _results.SceStats(out[2], None if prob else out[3], out[4], out[5])


# ---------------------------------------------------------------------------------------
# linear_cross_entropy
# ---------------------------------------------------------------------------------------

def _linear_grads(x, w, target, bias, ce_weight, reduction, ignore_index, label_smoothing,
                  z_loss, chunk_size, input_grad, row_scale=None, softcap=0.0,
                  return_stats=False, check_labels=True):
    """gpuce's chunked pass with return_grad: (loss, LinearGrads) arrays, and the SceStats
    last with return_stats."""
    arrays = [_to_array(v) for v in (x, w, target, bias, ce_weight, row_scale)]
    return _linear.linear_cross_entropy(
        *arrays[:3], bias=arrays[3], weight=arrays[4], grad_row_scale=arrays[5],
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, chunk_size=chunk_size, return_grad=True, input_grad=input_grad,
        softcap=softcap or None, return_stats=return_stats, check_labels=check_labels)


def _grad_tensors(grads, x, w, bias):
    """gpuce's LinearGrads as three tensors, empty where not computed."""
    return tuple(_none(x) if g is None else _to_tensor(g, like.dtype)
                 for g, like in zip(grads, (x, w, x if bias is None else bias)))


@torch.library.custom_op("gpuce::linear_cross_entropy", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _lce_op(x: Tensor, w: Tensor, target: Tensor, bias: Optional[Tensor],
            ce_weight: Optional[Tensor], reduction: str, ignore_index: int,
            label_smoothing: float, z_loss: float, chunk_size: Optional[int], input_grad: bool,
            need_grad: bool, softcap: float = 0.0, return_stats: bool = False,
            check_labels: bool = True, acc_loss: bool = False
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """gpuce.linear_cross_entropy: the loss and, with need_grad (reductions "mean" and
    "sum" only), the gradients (dX only with input_grad, db only with a bias) of the loss,
    computed in the same chunked pass, then with return_stats the statistics z_loss,
    accuracy, lse (empty tensors where not computed).  The loss has x's dtype, or with
    acc_loss the accumulation dtype (float32 for 16-bit x: autocast's cross-entropy)."""
    loss_dtype = _acc_of(x.dtype) if acc_loss else x.dtype
    with _device_of(x):
        if need_grad and reduction != "none":
            out = _linear_grads(x, w, target, bias, ce_weight, reduction, ignore_index,
                                label_smoothing, z_loss, chunk_size, input_grad, None, softcap,
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


@_lce_op.register_fake
def _lce_fake(x, w, target, bias, ce_weight, reduction, ignore_index, label_smoothing, z_loss,
              chunk_size, input_grad, need_grad, softcap=0.0, return_stats=False,
              check_labels=True, acc_loss=False):
    _check_reduction(reduction)
    loss = x.new_empty(x.shape[:1] if reduction == "none" else (),
                       dtype=_acc_of(x.dtype) if acc_loss else x.dtype)
    stats = _stats_fake(x, x.shape[:1], reduction, not target.is_floating_point(), return_stats)
    if not need_grad or reduction == "none":
        return (loss, _none(x), _none(x), _none(x)) + stats
    return (loss, x.new_empty(x.shape) if input_grad else _none(x), w.new_empty(w.shape),
            _none(x) if bias is None else bias.new_empty(bias.shape)) + stats


def _lce_setup_context(ctx, inputs, output):
    """Keeps the forward pass's gradients; the inputs only where backward runs gpuce's pass
    again (reduction="none", gradients for the target or ce_weight, or none computed)."""
    (x, w, target, bias, ce_weight, reduction, *opts, input_grad, need_grad, softcap,
     return_stats, check_labels, _acc_loss) = inputs
    need_x, need_w, need_t, need_b, need_cw = ctx.needs_input_grad[:5]
    # the gradients, the z-loss part, the accuracy and the predicted classes carry no
    # gradient; the per-row lse does
    ctx.mark_non_differentiable(*output[1:6], output[7])
    ctx.set_materialize_grads(False)  # None for an output that is not used
    ctx.loss_meta = (output[0].shape, output[0].dtype, output[0].device)
    have = need_grad and reduction != "none" and (input_grad or not need_x)
    ctx.recompute = (need_x or need_w or need_b) and not have
    # with return_stats the inputs are kept for lse's gradient (the logits formed again)
    ctx.lse_kept = return_stats and (need_x or need_w or need_b)
    keep = ctx.recompute or need_t or need_cw or ctx.lse_kept
    ctx.save_for_backward(*(output[1:4] if have else (None,) * 3),
                          *((x, w, target, bias, ce_weight) if keep else (None,) * 5))
    ctx.opts = (reduction, *opts)  # reduction, ignore_index, label_smoothing, z_loss, chunk_size
    ctx.llm = (softcap, check_labels)


def _lce_autograd_backward(ctx, grad_loss, _g_dx, _g_dw, _g_db, _g_z, _g_acc, grad_lse,
                           _g_predicted):
    d_x, d_w, d_b, x, w, target, bias, ce_weight = ctx.saved_tensors
    need_x, need_w, need_t, need_b, need_cw = ctx.needs_input_grad[:5]
    reduction, _, label_smoothing, _, chunk_size = ctx.opts
    if grad_loss is None:  # only the lse is differentiated
        d_x = d_w = d_b = d_t = d_cw = None
        need_t = need_cw = False
    elif ctx.recompute:
        d_x, d_w, d_b = torch.ops.gpuce.linear_cross_entropy_backward(
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
        d_t, d_cw = torch.ops.gpuce.linear_cross_entropy_target_backward(
            grad_loss, x, w, target, bias, ce_weight, reduction, label_smoothing, chunk_size,
            need_t, need_cw, ctx.llm[0])
    grads = tuple(g if need else None for g, need in zip((d_x, d_w, d_t, d_b, d_cw),
                                                         (need_x, need_w, need_t, need_b, need_cw)))
    return _first_order_only("linear_cross_entropy", grads) + (None,) * 11


_lce_op.register_autograd(_lce_autograd_backward, setup_context=_lce_setup_context)


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


@torch.library.custom_op("gpuce::linear_cross_entropy_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _lce_backward_op(grad_loss: Tensor, x: Tensor, w: Tensor, target: Tensor,
                     bias: Optional[Tensor], ce_weight: Optional[Tensor], reduction: str,
                     ignore_index: int, label_smoothing: float, z_loss: float,
                     chunk_size: Optional[int], input_grad: bool, softcap: float = 0.0,
                     check_labels: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ g·L (g = grad_loss) for X (with input_grad), W and the bias (empty
    without one): gpuce's chunked pass again, each gradient row scaled by g_i
    (``grad_row_scale``) before the products for reduction="none", the result scaled by g
    for "mean" and "sum"."""
    with _device_of(x):
        scale = grad_loss.contiguous() if reduction == "none" else None
        _, grads = _linear_grads(x, w, target, bias, ce_weight, reduction, ignore_index,
                                 label_smoothing, z_loss, chunk_size, input_grad, scale, softcap,
                                 False, check_labels)
        d = _grad_tensors(grads, x, w, bias)
    if reduction != "none":
        d = tuple(g if g.numel() == 0 else _times_incoming(g, grad_loss) for g in d)
    return d


@_lce_backward_op.register_fake
def _lce_backward_fake(grad_loss, x, w, target, bias, ce_weight, reduction, ignore_index,
                       label_smoothing, z_loss, chunk_size, input_grad, softcap=0.0,
                       check_labels=True):
    return (x.new_empty(x.shape) if input_grad else _none(x), w.new_empty(w.shape),
            _none(x) if bias is None else bias.new_empty(bias.shape))


_lce_backward_op.register_autograd(_raise_double_backward("linear_cross_entropy"))


@torch.library.custom_op("gpuce::linear_cross_entropy_target_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _lce_target_backward_op(grad_loss: Tensor, x: Tensor, w: Tensor, target: Tensor,
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


@_lce_target_backward_op.register_fake
def _lce_target_backward_fake(grad_loss, x, w, target, bias, ce_weight, reduction,
                              label_smoothing, chunk_size, target_grad, weight_grad, softcap=0.0):
    return (target.new_empty(target.shape) if target_grad else _none(x),
            ce_weight.new_empty(ce_weight.shape) if weight_grad else _none(x))


_lce_target_backward_op.register_autograd(_raise_double_backward("linear_cross_entropy"))


def _options_ignored(options):
    """torch's ``LinearCrossEntropyOptions`` (its chunking strategy) or None: accepted and
    ignored, gpuce chooses its own chunks (``chunk_size``); anything else is a TypeError."""
    if options is not None and type(options).__name__ != "LinearCrossEntropyOptions":
        raise TypeError("options must be None or a torch.nn.LinearCrossEntropyOptions (accepted "
                        f"and ignored: gpuce chunks by chunk_size), got {type(options).__name__}")


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=None, label_smoothing=0.0, options=None,
                         z_loss=0.0, chunk_size=None, softcap=None, return_stats=False,
                         check_labels=True, shift=0):
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
    _check_reduction(reduction)
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
    out = _lce_op(x, w, t, bias, ce_weight, reduction, ignore_index, label_smoothing, z_loss,
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


class CrossEntropyLoss(torch.nn.Module):
    """``torch.nn.CrossEntropyLoss`` on gpuce's kernels (same constructor; ``weight`` is a
    buffer, as in torch), plus gpuce's keyword-only ``z_loss``, ``softcap``, ``return_stats``
    (forward then returns ``(loss, stats)``) and ``check_labels``."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None,
                 return_stats=False, check_labels=True):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _legacy_reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        _llm_options(softcap, return_stats, check_labels)  # errors at construction
        self.softcap, self.return_stats, self.check_labels = softcap, return_stats, check_labels

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap,
                             return_stats=self.return_stats, check_labels=self.check_labels)


class LinearCrossEntropyLoss(torch.nn.Module):
    """``torch.nn.LinearCrossEntropyLoss`` (torch 2.13) on gpuce's chunked pass: the same
    constructor, parameters and ``forward(input, target)`` (the module holds
    ``self.linear``, an ``nn.Linear(in_features, num_classes * prod(out_features))``, and
    ``weight`` as a buffer), plus gpuce's keyword-only ``z_loss``, ``chunk_size``,
    ``softcap``, ``return_stats`` (forward then returns ``(loss, stats)``) and
    ``check_labels``.  ``options`` is accepted and ignored (see :func:`linear_cross_entropy`).
    """

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None,
                 dtype=None, reduction="mean", weight=None, ignore_index=None,
                 label_smoothing=0.0, options=None, z_loss=0.0, chunk_size=None, softcap=None,
                 return_stats=False, check_labels=True):
        super().__init__()
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape {(num_classes,)}, got {tuple(weight.shape)}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        _check_reduction(reduction)
        _options_ignored(options)
        _llm_options(softcap, return_stats, check_labels)  # errors at construction
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.chunk_size = chunk_size
        self.softcap, self.return_stats, self.check_labels = softcap, return_stats, check_labels
        self.linear = torch.nn.Linear(in_features, math.prod(self.out_features, start=num_classes),
                                      bias=bias, device=device, dtype=dtype)

    def forward(self, input, target):
        lin = self.linear
        w = lin.weight.reshape((self.num_classes, *self.out_features, lin.in_features))
        b = None if lin.bias is None else lin.bias.reshape((self.num_classes, *self.out_features))
        return linear_cross_entropy(input, w, target, linear_bias=b, weight=self.weight,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, options=self.options,
                                    z_loss=self.z_loss, chunk_size=self.chunk_size,
                                    softcap=self.softcap, return_stats=self.return_stats,
                                    check_labels=self.check_labels)

    def extra_repr(self):
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}")


def patch(model, *, z_loss=0.0, chunk_size=None, return_logits="auto"):
    """Make a Hugging Face transformers causal LM (Llama, Mistral, Qwen2, Qwen3, GPT-2, Gemma,
    Gemma 2) compute its training loss with :func:`linear_cross_entropy` straight from the
    hidden states and ``lm_head``, never forming the logits.  The instance is patched in
    place and returned.

    A call with ``labels`` shifts them as transformers does (padded with -100, the hidden
    states not copied; a ``shift_labels=`` keyword is used as given), ignores -100, and
    divides the summed loss by ``num_items_in_batch`` when given (Trainer's gradient
    accumulation), else takes the mean over the tokens that are not ignored.  Gemma 2's
    ``final_logit_softcapping`` is gpuce's ``softcap``.  ``return_logits``: "auto" returns no
    logits in training mode and the model's own in eval mode; True / False decide instead
    (also as a keyword of the call).  ``z_loss`` and ``chunk_size`` are passed to
    :func:`linear_cross_entropy`.  Calls without labels run the model's forward untouched.
    Other architectures raise ValueError.  Needs ``transformers``."""
    from . import _hf

    return _hf.patch(model, linear_cross_entropy, z_loss=z_loss, chunk_size=chunk_size,
                     return_logits=return_logits)


def unpatch(model):
    """Undo :func:`patch` on this model instance.  Returns the model."""
    from . import _hf

    return _hf.unpatch(model)


def is_patched(model):
    """Whether :func:`patch` is in effect on this model instance."""
    from . import _hf

    return _hf.is_patched(model)
