"""gpuce.torch.distillation_loss and linear_distillation_loss: the ``gpuce::distillation_loss``
and ``gpuce::linear_distillation_loss`` operators (a student's loss against a teacher's softmax:
forward or reverse KL, the generalised JSD, at a temperature; dense or sparse top-k teachers;
the linear form never holds either model's logits), their backward operators, their spec
entries (:mod:`._spec`) and the public functions.

As for cross-entropy, "mean" and "sum" compute the student's gradient in the forward pass
(for an incoming gradient of 1) and scale it in backward; reduction="none" (whose rows'
incoming gradients are known only in backward) and a forward pass that computed no gradient
run the rows again in the backward operator, each row's gradient scaled before its one
rounding.  The teacher is a constant: a teacher tensor that requires grad raises."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _validation as _V
from ..distillation import distillation_loss as _distillation_loss
from ..distillation import linear_distillation_loss as _linear_distillation_loss
from ._autograd import _times_incoming
from ._bridge import (_acc_of, _check_device, _check_dtype, _device_of, _none, _to_array,
                      _to_tensor)
from ._spec import OpSpec, define


def _teacher_array(teacher, teacher_indices):
    """The array function's teacher: dense logits, or the (indices, log_probs) pair."""
    if teacher_indices is None:
        return _to_array(teacher)
    return (_to_array(teacher_indices), _to_array(teacher))


def _loss_fake(like, lead, reduction):
    _V.check_reduction(reduction)
    return like.new_empty(tuple(lead) if reduction == "none" else (), dtype=_acc_of(like.dtype))


# ---------------------------------------------------------------------------------------
# distillation_loss
# ---------------------------------------------------------------------------------------

def _dl_impl(student: Tensor, teacher: Tensor, teacher_indices: Optional[Tensor],
             target: Optional[Tensor], beta: float, temperature: float, ignore_index: int,
             reduction: str, softcap: float, need_grad: bool) -> tuple[Tensor, Tensor]:
    """gpuce.distillation_loss on (..., C) student logits against dense teacher logits
    (teacher_indices None) or a sparse teacher (teacher: its (..., k) log-probabilities at
    teacher_indices): the loss (accumulation dtype) and, with need_grad ("mean" and "sum"),
    its gradient with respect to the student (student's dtype, else empty)."""
    grad = need_grad and reduction != "none"
    with _device_of(student):
        out = _distillation_loss(_to_array(student), _teacher_array(teacher, teacher_indices),
                                 _to_array(target), beta=beta, temperature=temperature,
                                 ignore_index=ignore_index, reduction=reduction,
                                 softcap=softcap or None, return_grad=grad)
        loss, g = out if grad else (out, None)
        return (_to_tensor(loss, _acc_of(student.dtype)),
                _none(student) if g is None else _to_tensor(g, student.dtype))


def _dl_fake(student, teacher, teacher_indices, target, beta, temperature, ignore_index,
             reduction, softcap, need_grad):
    grad = need_grad and reduction != "none"
    return (_loss_fake(student, student.shape[:-1], reduction),
            student.new_empty(student.shape) if grad else _none(student))


def _dl_setup_context(ctx, inputs, output):
    (student, teacher, teacher_indices, target, beta, temperature, ignore_index, reduction,
     softcap, need_grad) = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.have = need_grad and reduction != "none"
    ctx.save_for_backward(output[1] if ctx.have else None,
                          *((None,) * 4 if ctx.have else (student, teacher, teacher_indices,
                                                          target)))
    ctx.opts = (beta, temperature, ignore_index, reduction, softcap)


def _dl_backward(ctx, grad_loss, _g_grad):
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,)
    grad, student, teacher, teacher_indices, target = ctx.saved_tensors
    if ctx.have:
        return (_times_incoming(grad, grad_loss),)
    return (DISTILLATION_LOSS_BACKWARD(grad_loss, student, teacher, teacher_indices, target,
                                       *ctx.opts),)


def _dl_backward_impl(grad_loss: Tensor, student: Tensor, teacher: Tensor,
                      teacher_indices: Optional[Tensor], target: Optional[Tensor], beta: float,
                      temperature: float, ignore_index: int, reduction: str,
                      softcap: float) -> Tensor:
    """The gradient of Σ g·L with respect to the student (g = grad_loss; per row for
    reduction="none", each row's gradient scaled in the accumulation dtype and rounded once)."""
    with _device_of(student):
        rows = reduction == "none"
        out = _distillation_loss(_to_array(student), _teacher_array(teacher, teacher_indices),
                                 _to_array(target), beta=beta, temperature=temperature,
                                 ignore_index=ignore_index, reduction=reduction,
                                 softcap=softcap or None, return_grad=True,
                                 grad_row_scale=_to_array(grad_loss) if rows else None,
                                 _labels_checked=True)  # checked by the forward: no sync
        grad = _to_tensor(out[1], student.dtype)
    return grad if rows else _times_incoming(grad, grad_loss)


def _dl_backward_fake(grad_loss, student, teacher, teacher_indices, target, beta, temperature,
                      ignore_index, reduction, softcap):
    return student.new_empty(student.shape)


DISTILLATION_LOSS = define(OpSpec("distillation_loss", impl=_dl_impl, fake=_dl_fake,
                                  setup_context=_dl_setup_context, backward=_dl_backward))
DISTILLATION_LOSS_BACKWARD = define(OpSpec("distillation_loss_backward",
                                           impl=_dl_backward_impl, fake=_dl_backward_fake,
                                           first_order_of="distillation_loss"))


# ---------------------------------------------------------------------------------------
# linear_distillation_loss
# ---------------------------------------------------------------------------------------

def _grad_tensors(grads, xs, ws, bs):
    return (_none(xs) if grads.X is None else _to_tensor(grads.X, xs.dtype),
            _to_tensor(grads.W, ws.dtype),
            _none(xs) if grads.bias is None else _to_tensor(grads.bias, bs.dtype))


def _ldl_impl(xs: Tensor, ws: Tensor, xt: Tensor, wt: Tensor, target: Optional[Tensor],
              bs: Optional[Tensor], bt: Optional[Tensor], beta: float, temperature: float,
              ignore_index: int, reduction: str, softcap: float, chunk_size: Optional[int],
              x_grad: bool, need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """gpuce.linear_distillation_loss: the loss and, with need_grad ("mean" and "sum"), the
    student's gradients dX (with x_grad), dW, db (with a bias) from the same chunked pass."""
    grad = need_grad and reduction != "none"
    with _device_of(xs):
        out = _linear_distillation_loss(
            *(_to_array(v) for v in (xs, ws, xt, wt, target)), bias_student=_to_array(bs),
            bias_teacher=_to_array(bt), chunk_size=chunk_size, beta=beta,
            temperature=temperature, ignore_index=ignore_index, reduction=reduction,
            softcap=softcap or None, return_grad=grad, input_grad=x_grad)
        loss = _to_tensor(out[0] if grad else out, _acc_of(xs.dtype))
        if not grad:
            return loss, _none(xs), _none(xs), _none(xs)
        return (loss,) + _grad_tensors(out[1], xs, ws, bs)


def _ldl_fake(xs, ws, xt, wt, target, bs, bt, beta, temperature, ignore_index, reduction,
              softcap, chunk_size, x_grad, need_grad):
    grad = need_grad and reduction != "none"
    return (_loss_fake(xs, xs.shape[:1], reduction),
            xs.new_empty(xs.shape) if grad and x_grad else _none(xs),
            ws.new_empty(ws.shape) if grad else _none(xs),
            bs.new_empty(bs.shape) if grad and bs is not None else _none(xs))


def _ldl_setup_context(ctx, inputs, output):
    (xs, ws, xt, wt, target, bs, bt, beta, temperature, ignore_index, reduction, softcap,
     chunk_size, x_grad, need_grad) = inputs
    need_x, need_w = ctx.needs_input_grad[:2]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.have = need_grad and reduction != "none" and (x_grad or not need_x)
    ctx.save_for_backward(*(output[1:] if ctx.have else (None,) * 3),
                          *((None,) * 7 if ctx.have else (xs, ws, xt, wt, target, bs, bt)))
    ctx.opts = (beta, temperature, ignore_index, reduction, softcap, chunk_size)


def _ldl_backward(ctx, grad_loss, _g_dx, _g_dw, _g_db):
    need_x, need_w, _, _, _, need_b = ctx.needs_input_grad[:6]
    if grad_loss is None or not (need_x or need_w or need_b):
        return (None,) * 6
    d_x, d_w, d_b, xs, ws, xt, wt, target, bs, bt = ctx.saved_tensors
    if ctx.have:
        d_x, d_w, d_b = (_times_incoming(g, grad_loss) if need else None
                         for g, need in zip((d_x, d_w, d_b), (need_x, need_w, need_b)))
    else:
        d_x, d_w, d_b = LINEAR_DISTILLATION_LOSS_BACKWARD(grad_loss, xs, ws, xt, wt, target, bs,
                                                          bt, *ctx.opts, need_x)
    return (d_x if need_x else None, d_w if need_w else None, None, None, None,
            d_b if need_b else None)


def _ldl_backward_impl(grad_loss: Tensor, xs: Tensor, ws: Tensor, xt: Tensor, wt: Tensor,
                       target: Optional[Tensor], bs: Optional[Tensor], bt: Optional[Tensor],
                       beta: float, temperature: float, ignore_index: int, reduction: str,
                       softcap: float, chunk_size: Optional[int], x_grad: bool
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """The student's gradients of Σ g·L: gpuce's chunked pass again (reduction="none": each
    row's gradient scaled by its g before the GEMMs)."""
    rows = reduction == "none"
    with _device_of(xs):
        out = _linear_distillation_loss(
            *(_to_array(v) for v in (xs, ws, xt, wt, target)), bias_student=_to_array(bs),
            bias_teacher=_to_array(bt), chunk_size=chunk_size, beta=beta,
            temperature=temperature, ignore_index=ignore_index, reduction=reduction,
            softcap=softcap or None, return_grad=True, input_grad=x_grad, check_finite=False,
            grad_row_scale=_to_array(grad_loss) if rows else None, _labels_checked=True)
        d_x, d_w, d_b = _grad_tensors(out[1], xs, ws, bs)
    if rows:
        return d_x, d_w, d_b
    return (_times_incoming(d_x, grad_loss) if x_grad else d_x, _times_incoming(d_w, grad_loss),
            d_b if bs is None else _times_incoming(d_b, grad_loss))


def _ldl_backward_fake(grad_loss, xs, ws, xt, wt, target, bs, bt, beta, temperature,
                       ignore_index, reduction, softcap, chunk_size, x_grad):
    return (xs.new_empty(xs.shape) if x_grad else _none(xs), ws.new_empty(ws.shape),
            _none(xs) if bs is None else bs.new_empty(bs.shape))


LINEAR_DISTILLATION_LOSS = define(OpSpec(
    "linear_distillation_loss", impl=_ldl_impl, fake=_ldl_fake,
    setup_context=_ldl_setup_context, backward=_ldl_backward))
LINEAR_DISTILLATION_LOSS_BACKWARD = define(OpSpec(
    "linear_distillation_loss_backward", impl=_ldl_backward_impl, fake=_ldl_backward_fake,
    first_order_of="linear_distillation_loss"))


# ---------------------------------------------------------------------------------------
# the public functions
# ---------------------------------------------------------------------------------------

_CONSTANT_TEACHER = ("gpuce.torch.{fn}: the teacher is a constant (no gradient flows to it), "
                     "but {name} requires grad; pass {name}.detach() (or compute the teacher "
                     "under torch.no_grad())")


def _tensor(t, name, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}")


def _check_target(target, lead):
    if target is None:
        return
    _tensor(target, "target")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must be integer labels, got {target.dtype}")
    if tuple(target.shape) != tuple(lead):
        raise ValueError(f"target must have the rows' shape {tuple(lead)}, got {tuple(target.shape)}")


def _options(beta, temperature, ignore_index, reduction, softcap):
    b = _V.check_beta(beta)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _V.check_reduction(reduction)
    return (b, _V.check_temperature(temperature), int(ignore_index), reduction,
            _V.check_softcap(softcap))


def distillation_loss(student_logits, teacher_logits, target=None, *, beta=0.0, temperature=1.0,
                      ignore_index=-100, reduction="mean", softcap=None):
    r"""The distillation loss of student logits against a teacher's (class axis last, any
    leading dims), as :func:`gpuce.distillation_loss`: β = 0 the forward KL(p_T ‖ p_S), β = 1
    the reverse KL(p_S ‖ p_T), between them the generalised JSD, with p = softmax(cap(f) / τ).
    No τ² factor.

    Parameters
    ----------
    student_logits : (..., C) float16, bfloat16, float32 or float64 tensor, CPU or CUDA
    teacher_logits : (..., C) tensor, or a sparse top-k teacher ``(indices, log_probs)`` of
        (..., k) tensors (β = 0 only; the KL over the teacher's support, its tail mass adding
        nothing: see :func:`gpuce.distillation_loss`).  A constant: a teacher tensor that
        requires grad raises RuntimeError (detach it).
    target : (...) integer tensor, optional
        Rows whose label equals ``ignore_index`` are skipped.
    beta, temperature, ignore_index, reduction, softcap
        As :func:`gpuce.distillation_loss`.

    Returns
    -------
    Tensor
        The loss, float32 for 16-bit and float32 students (float64 for float64), differentiable
        with respect to ``student_logits``.

    Notes
    -----
    The gradient comes back in the student's dtype.  With "mean" and "sum" it is formed in the
    forward pass for an incoming gradient of 1 and multiplied by the incoming scalar in
    backward (exact for powers of two); with "none" it is formed in backward, each row scaled
    before its one rounding.  Double backward raises RuntimeError; works inside
    ``torch.compile`` (fullgraph).
    """
    _tensor(student_logits, "student_logits")
    _check_dtype(student_logits, "student_logits")
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have a class axis (at least 1-D)")
    sparse = isinstance(teacher_logits, (tuple, list))
    if sparse:
        if len(teacher_logits) != 2:
            raise ValueError("a sparse teacher is a pair (indices, log_probs)")
        indices, teacher = teacher_logits
        _tensor(indices, "the teacher's indices")
        _tensor(teacher, "the teacher's log_probs")
    else:
        indices, teacher = None, teacher_logits
        _tensor(teacher, "teacher_logits")
    _check_dtype(teacher, "the teacher's log_probs" if sparse else "teacher_logits")
    _check_target(target, student_logits.shape[:-1])
    _check_device(student_logits, teacher, indices, target)
    opts = _options(beta, temperature, ignore_index, reduction, softcap)
    grad_mode = torch.is_grad_enabled()
    if grad_mode and teacher.requires_grad:
        raise RuntimeError(_CONSTANT_TEACHER.format(
            fn="distillation_loss", name="the teacher's log_probs" if sparse else "teacher_logits"))
    need_grad = grad_mode and student_logits.requires_grad
    return DISTILLATION_LOSS(student_logits, teacher, indices, target, *opts, need_grad)[0]


def linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight,
                             target=None, *, student_bias=None, teacher_bias=None,
                             chunk_size=None, beta=0.0, temperature=1.0, ignore_index=-100,
                             reduction="mean", softcap=None):
    r""":func:`distillation_loss` of the student's logits ``student_input @ student_weight.T
    (+ student_bias)`` against the teacher's ``teacher_input @ teacher_weight.T (+
    teacher_bias)``, a chunk of rows at a time: neither model's N × C logits exist whole.

    Parameters
    ----------
    student_input : (..., D_s) tensor;  student_weight : (C, D_s) of its dtype
    teacher_input : (..., D_t) tensor of student_input's leading shape;  teacher_weight :
        (C, D_t) of its dtype (the models may differ in width and dtype).  Constants: a
        teacher tensor that requires grad raises RuntimeError.
    target : (...) integer tensor, optional
    student_bias, teacher_bias : (C,) tensors, optional
    chunk_size : int, optional
        Rows a chunk (chosen from the problem and free memory when None).
    beta, temperature, ignore_index, reduction, softcap
        As :func:`distillation_loss`.

    Returns
    -------
    Tensor
        The loss (float32 for 16-bit and float32 students, float64 for float64),
        differentiable with respect to the student's input, weight and bias (16-bit dW
        accumulated in float32 and rounded once).  Double backward raises RuntimeError;
        works inside ``torch.compile``.
    """
    names = ("student_input", "student_weight", "teacher_input", "teacher_weight")
    tensors = (student_input, student_weight, teacher_input, teacher_weight)
    for t, name in zip(tensors, names):
        _tensor(t, name)
        _check_dtype(t, name)
    for t, name in ((student_bias, "student_bias"), (teacher_bias, "teacher_bias")):
        _tensor(t, name, optional=True)
        if t is not None:
            _check_dtype(t, name)
    if student_input.dim() < 1 or teacher_input.dim() < 1:
        raise ValueError("the inputs must be (..., D)")
    lead = student_input.shape[:-1]
    if tuple(teacher_input.shape[:-1]) != tuple(lead):
        raise ValueError(f"student and teacher inputs must have the same rows: "
                         f"{tuple(student_input.shape)} and {tuple(teacher_input.shape)}")
    _check_target(target, lead)
    _check_device(*tensors, student_bias, teacher_bias, target)
    opts = _options(beta, temperature, ignore_index, reduction, softcap)
    chunk_size = _V.check_chunk_size(chunk_size)
    grad_mode = torch.is_grad_enabled()
    for t, name in ((teacher_input, "teacher_input"), (teacher_weight, "teacher_weight"),
                    (teacher_bias, "teacher_bias")):
        if grad_mode and t is not None and t.requires_grad:
            raise RuntimeError(_CONSTANT_TEACHER.format(fn="linear_distillation_loss", name=name))
    need_x = grad_mode and student_input.requires_grad
    need_grad = grad_mode and (need_x or student_weight.requires_grad
                               or (student_bias is not None and student_bias.requires_grad))
    xs = student_input.reshape(-1, student_input.shape[-1])
    xt = teacher_input.reshape(-1, teacher_input.shape[-1])
    t = None if target is None else target.reshape(-1)
    loss = LINEAR_DISTILLATION_LOSS(xs, student_weight, xt, teacher_weight, t, student_bias,
                                    teacher_bias, *opts, chunk_size, need_x, need_grad)[0]
    return loss.reshape(lead) if opts[3] == "none" else loss
