"""torch adapter: gpuce's kernels as ``torch.autograd.Function`` s.

``gpuce.torch.cross_entropy`` is a drop-in for ``torch.nn.functional.cross_entropy`` (same
arguments, class axis 1, integer or probability targets, the same loss dtype) and
``gpuce.torch.linear_cross_entropy`` fuses ``F.linear`` with it without materialising the
N x C logits (gpuce's chunked linear model).  Tensors cross without copies: CUDA tensors
become CuPy arrays through DLPack (the GPU kernels), CPU tensors become NumPy arrays (the
NumPy path).  The gradient is computed in the forward pass, fused with the loss, and
scaled by the incoming gradient in backward.

torch is an optional dependency: import this module only where torch is installed.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from . import linear as _linear
from ._backend import is_cupy_array
from .sce import softmax_cross_entropy as _sce

SUPPORTED_DTYPES = (torch.float16, torch.float32, torch.float64)


def _check_dtype(t, name):
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"gpuce.torch: {name} has dtype {t.dtype}, which gpuce does not support; supported: "
            "torch.float16, torch.float32, torch.float64 (cast with .float() first)")


def _to_array(t):
    """The tensor's data as a CuPy (CUDA) or NumPy (CPU) array, sharing memory."""
    if t is None:
        return None
    t = t.detach()
    if t.is_cuda:
        import cupy

        return cupy.from_dlpack(t)
    if t.device.type != "cpu":
        raise TypeError(f"gpuce.torch supports CPU and CUDA tensors, got device {t.device}")
    return t.resolve_conj().resolve_neg().numpy()


def _to_tensor(a, like):
    """An array returned by gpuce as a tensor on ``like``'s device (no copy)."""
    if a is None:
        return None
    if is_cupy_array(a):
        return torch.from_dlpack(a)
    a = np.asarray(a)
    return torch.from_numpy(a if a.flags.c_contiguous else a.copy())


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


def _legacy_reduction(size_average, reduce, reduction):
    """torch's mapping of the deprecated size_average / reduce arguments."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    return "none" if not reduce else ("mean" if size_average else "sum")


def _same_device(*tensors):
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"gpuce.torch: all tensors must be on one device, got {sorted(map(str, devs))}")


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, weight, opts):
        need = ctx.needs_input_grad[0]
        ctx.reduction = opts["reduction"]
        with _device_of(x):
            out = _sce(_to_array(x), _to_array(target), weight=_to_array(weight),
                       return_grad=need, **opts)
            loss, grad = out if need else (out, None)
            ctx.grad = None if grad is None else _to_tensor(grad, x)
            return _to_tensor(loss, x).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        g = ctx.grad  # kept: backward may run again with retain_graph=True
        if g is None:
            return None, None, None, None
        go = grad_loss.to(g.dtype)
        g = g * (go.unsqueeze(-1) if ctx.reduction == "none" else go)
        return g, None, None, None


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, z_loss=0.0):
    """``torch.nn.functional.cross_entropy`` on gpuce's fused kernels.

    input : (N, C), (C,) or (N, C, d1, ...) float16/32/64 tensor, CPU or CUDA
    target : integer class indices of shape (N,), () or (N, d1, ...), or class
        probabilities of input's shape
    weight, ignore_index, reduction, label_smoothing : as torch (size_average and reduce,
        deprecated in torch, are mapped as torch maps them)
    z_loss : float, keyword only
        gpuce's extra z_loss · lse² term per row (0 = torch's loss).

    The loss has input's dtype (as torch).  Gradients flow to ``input``; a probability
    target that requires grad raises NotImplementedError (gpuce does not differentiate
    with respect to targets).  Raises TypeError for dtypes gpuce lacks (bfloat16, ...).
    """
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("gpuce.torch.cross_entropy expects torch tensors for input and target")
    _check_dtype(input, "input")
    if weight is not None:
        _check_dtype(weight, "weight")
    _same_device(input, target, weight)
    prob = target.is_floating_point()
    if prob:
        _check_dtype(target, "target")
        if target.requires_grad:
            raise NotImplementedError("gpuce.torch.cross_entropy does not differentiate with "
                                      "respect to probability targets; pass target.detach()")
    elif target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be integer class indices or float probabilities, got {target.dtype}")
    x = input.movedim(1, -1) if input.dim() >= 2 else input  # gpuce: classes last
    t = target.movedim(1, -1) if prob and target.dim() >= 2 else target
    opts = dict(reduction=_legacy_reduction(size_average, reduce, reduction),
                ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss)
    return _CrossEntropy.apply(x, t, weight, opts)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, target, b, ce_weight, opts):
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        need = need_x or need_w or need_b
        ctx.reduction = opts["reduction"]
        ctx.saved = None
        if need and ctx.reduction == "none":
            # the row weights of the backward pass are unknown here: recompute there
            ctx.save_for_backward(x, w, target, b, ce_weight)
            ctx.opts = opts
            need = False
        with _device_of(x):
            arrays = [_to_array(v) for v in (x, w, target, b, ce_weight)]
            out = _linear.linear_cross_entropy(*arrays[:3], bias=arrays[3], weight=arrays[4],
                                               return_grad=need, input_grad=need_x, **opts)
            loss, grads = out if need else (out, None)
            if grads is not None:
                ctx.saved = tuple(_to_tensor(g, x) for g in grads)
            return _to_tensor(loss, x).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        if ctx.reduction == "none":
            with _device_of(grad_loss):
                dX, dW, db = _linear_rows_backward(ctx, grad_loss)
        elif ctx.saved is None:
            return (None,) * 6
        else:
            dX, dW, db = ctx.saved
            go = grad_loss.to(dW.dtype)
            dX, dW, db = (None if g is None else g * go for g in (dX, dW, db))
        return (dX if need_x else None, dW if need_w else None, None,
                db if need_b else None, None, None)


def _linear_rows_backward(ctx, grad_loss):
    """Gradients of Σ_i g_i L_i (reduction="none"): gpuce's chunked pass again, each
    gradient row scaled by g_i (``grad_row_scale``) before the products."""
    x, w, target, b, ce_weight = ctx.saved_tensors
    arrays = [_to_array(v) for v in (x, w, target, b, ce_weight, grad_loss.contiguous())]
    _, grads = _linear.linear_cross_entropy(
        *arrays[:3], bias=arrays[3], weight=arrays[4], grad_row_scale=arrays[5],
        return_grad=True, input_grad=ctx.needs_input_grad[0], **ctx.opts)
    return tuple(_to_tensor(g, x) for g in grads)


def linear_cross_entropy(input, weight, target, bias=None, *, ce_weight=None, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, z_loss=0.0, chunk_size=None):
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` without the N x C logits.

    input : (..., D) tensor; weight : (C, D) (``nn.Linear.weight``); bias : (C,) or None
    target : integer class indices of shape input.shape[:-1], or probabilities (..., C)
    ce_weight : (C,) per-class weight of the cross-entropy (torch's ``weight`` argument)
    reduction, ignore_index, label_smoothing : as torch; z_loss as gpuce.softmax_cross_entropy
    chunk_size : rows per chunk (None: chosen from the free memory)

    Gradients for input, weight and bias are computed in the forward pass (one chunked
    pass); with reduction="none" they are recomputed in backward, chunk by chunk, because
    the per-row gradient weights are only known there.
    """
    for t, name in ((input, "input"), (weight, "weight"), (target, "target")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gpuce.torch.linear_cross_entropy expects a tensor for {name}")
    _check_dtype(input, "input")
    _check_dtype(weight, "weight")
    for t, name in ((bias, "bias"), (ce_weight, "ce_weight")):
        if t is not None:
            _check_dtype(t, name)
    _same_device(input, weight, target, bias, ce_weight)
    if target.is_floating_point():
        _check_dtype(target, "target")
        if target.requires_grad:
            raise NotImplementedError("gpuce.torch.linear_cross_entropy does not differentiate "
                                      "with respect to probability targets; pass target.detach()")
    if input.dim() < 1:
        raise ValueError("input must have at least one dimension (features last)")
    lead = tuple(input.shape[:-1])
    c = weight.shape[0] if weight.dim() == 2 else None
    want = lead + (c,) if target.is_floating_point() else lead
    if tuple(target.shape) != want:
        raise ValueError(f"target must have shape {want} (input {tuple(input.shape)}, "
                         f"weight {tuple(weight.shape)}), got {tuple(target.shape)}")
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1, target.shape[-1]) if target.is_floating_point() else target.reshape(-1)
    opts = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                z_loss=z_loss, chunk_size=chunk_size)
    loss = _LinearCrossEntropy.apply(x, weight, t, bias, ce_weight, opts)
    return loss.reshape(lead) if reduction == "none" else loss


class CrossEntropyLoss(torch.nn.Module):
    """``torch.nn.CrossEntropyLoss`` on gpuce's kernels (same constructor; ``weight`` is a
    buffer, as in torch), plus gpuce's keyword-only ``z_loss``."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, z_loss=0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _legacy_reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`linear_cross_entropy`: ``forward(input, weight, target, bias=None)``
    with the language-model head's ``weight`` (and ``bias``) passed per call."""

    def __init__(self, ce_weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                 z_loss=0.0, chunk_size=None):
        super().__init__()
        self.register_buffer("ce_weight", ce_weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.chunk_size = chunk_size

    def forward(self, input, weight, target, bias=None):
        return linear_cross_entropy(input, weight, target, bias, ce_weight=self.ce_weight,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                                    chunk_size=self.chunk_size)
