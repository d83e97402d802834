"""The one validation module: argument checks shared by both backends.

Every check raises a real exception (never ``assert``) with a message that says
what was expected and what came.  :func:`sce_args` looks only at metadata (dtype,
shape, Python scalars), as does the aliasing check; the label range is checked by each
backend with :func:`label_error` formatting the message.  Two value checks live here:
:func:`check_uint64_labels` (one small read on the GPU, only for the rare uint64 labels, which
the backends' int64 reading would wrap) and :func:`check_class_weight` (NumPy weights; CuPy
weights are checked on the device by the kernels and read back after the last launch).
"""

from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass

import numpy as np

from ._backend import all_finite, shares_memory

REDUCTIONS = ("none", "sum", "mean")


def bfloat16_dtype():
    """NumPy's dtype of ``ml_dtypes.bfloat16`` (the CPU bfloat16 that CuPy and JAX use too),
    or None where ml_dtypes is not installed.  The one place gpuce imports ml_dtypes, and only
    when a bfloat16 dtype is asked for: ``import gpuce`` does not pay for its import."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


# the input dtypes gpuce computes with; bfloat16 and float16 accumulate in float32
NATIVE_FLOAT_DTYPES = tuple(np.dtype(t) for t in (np.float16, np.float32, np.float64))
FLOAT_NAMES = "float16, bfloat16, float32 or float64"


def is_float_dtype(dtype) -> bool:
    """True for the float dtypes gpuce takes (float16, bfloat16, float32, float64), in either
    byte order (:func:`gpuce._backend.asarray` gives the backends native-order copies).  Not
    ``dtype.kind == "f"``: ml_dtypes' bfloat16 has kind "V", its float8_e5m2 kind "f"."""
    dtype = np.dtype(dtype).newbyteorder("=")
    return dtype in NATIVE_FLOAT_DTYPES or is_bfloat16(dtype)


def is_bfloat16(dtype) -> bool:
    """Whether ``dtype`` is ml_dtypes' bfloat16.  An array of that dtype exists only once
    ml_dtypes is imported, so ml_dtypes is never imported to answer."""
    dtype = np.dtype(dtype)
    if dtype.name != "bfloat16" or dtype.itemsize != 2 or "ml_dtypes" not in sys.modules:
        return False
    return dtype == bfloat16_dtype()


def acc_dtype(dtype) -> np.dtype:
    """Accumulation dtype: float32 for float16/bfloat16/float32 inputs, float64 for float64."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def check_float(x, name: str):
    if not is_float_dtype(x.dtype):
        raise TypeError(f"{name} must be {FLOAT_NAMES}, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d array")


def check_axis(axis, ndim: int) -> int:
    if isinstance(axis, (bool, np.bool_)):  # operator.index(True) is 1; NumPy refuses bools
        raise TypeError("axis must be an integer, got bool")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of bounds for an array of dimension {ndim}")
    return axis % ndim


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}")
    return reduction


def check_same_shape(p, q, pname="p", qname="q"):
    if p.shape != q.shape:
        raise ValueError(f"{pname} and {qname} must have the same shape, got {p.shape} and {q.shape}")


@dataclass
class SceArgs:
    """Normalised arguments of softmax_cross_entropy."""

    kind: str  # "label" or "prob"
    lead_shape: tuple  # logits.shape[:-1]
    n: int  # rows = prod(lead_shape)
    c: int  # classes
    acc: np.dtype
    reduction: str
    ignore_index: int
    label_smoothing: float
    z_loss: float
    return_grad: bool
    inplace: bool
    # set by callers that validated the labels over a larger array first (chunked
    # linear_cross_entropy): the backends then skip their own range check
    labels_checked: bool = False
    # logit soft-capping: the loss sees softcap * tanh(f / softcap); 0.0 for none
    softcap: float = 0.0
    # also compute the statistics returned with the loss (SceStats)
    return_stats: bool = False
    # False: the GPU backends do not read back the label check (no host sync); a bad label
    # gives a NaN row instead of an exception
    check_labels: bool = True
    # the "mean" reduction's denominator of a whole call whose rows these are (the block walk,
    # the linear model's chunks): the backends divide these rows' loss sum, z-loss part and
    # gradient by it instead of their own rows' denominator, so that a 16-bit gradient is
    # rounded once, after the scaling; None: the rows' own
    denominator: float | None = None

    def mean_scale(self, denom) -> float:
        """The factor the summed loss and the gradient are scaled by: ``1 / denom`` for
        reduction "mean" (0 when ``denom`` is 0: the zero-denominator rule gives a 0 loss
        and a 0 gradient, where torch gives NaN), 1 for "sum" and "none"."""
        if self.reduction != "mean":
            return 1.0
        return 0.0 if denom == 0 else 1.0 / denom


def sce_args(logits, target, *, reduction, ignore_index, weight, label_smoothing, z_loss,
             return_grad, inplace, softcap=None, return_stats=False,
             check_labels=True) -> SceArgs:
    check_float(logits, "logits")
    c = logits.shape[-1]
    if c < 1:
        raise ValueError(f"logits must have at least one class along the last axis, got shape {logits.shape}")
    lead = tuple(logits.shape[:-1])
    kind_char = np.dtype(target.dtype).kind
    if kind_char in "iu":
        kind = "label"
        if target.shape != lead:
            raise ValueError(
                f"integer labels must have shape logits.shape[:-1] = {lead}, got {target.shape}"
            )
    elif is_float_dtype(target.dtype):
        # any of the float dtypes, whatever the logits' one: read in the accumulation dtype
        # (float32 holds float16 and bfloat16 exactly), never rounded to the logits' dtype
        kind = "prob"
        if target.shape != logits.shape:
            raise ValueError(
                f"probability targets (float labels) must have the logits' shape {logits.shape}, "
                f"got {target.shape}"
            )
    else:
        raise TypeError(f"target must be integer class labels or {FLOAT_NAMES} probabilities, "
                        f"got {target.dtype}")
    check_reduction(reduction)
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}") from None
    if kind == "prob" and ignore_index >= 0:
        raise ValueError(
            "ignore_index is not supported for probability targets (as in torch); "
            f"got ignore_index={ignore_index}"
        )
    if weight is not None:
        if not (is_float_dtype(weight.dtype) or np.dtype(weight.dtype).kind in "iu"):
            raise TypeError(f"weight must be a real array (integer or {FLOAT_NAMES}), "
                            f"got {weight.dtype}")
        if weight.ndim != 1 or weight.shape[0] != c:
            raise ValueError(f"weight must have shape ({c},) (one per class), got {weight.shape}")
    label_smoothing = _real(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    z_loss = _real(z_loss, "z_loss")
    if not (math.isfinite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if inplace and not return_grad:
        raise ValueError("inplace=True writes the gradient into logits and needs return_grad=True")
    if inplace:
        flags = getattr(logits, "flags", None)
        if flags is not None and not getattr(flags, "writeable", True):
            raise ValueError("inplace=True needs writeable logits")
    softcap = check_softcap(softcap)
    return_stats = check_flag(return_stats, "return_stats")
    check_labels = check_flag(check_labels, "check_labels")
    n = math.prod(lead)
    return SceArgs(kind, lead, n, c, acc_dtype(logits.dtype), reduction, ignore_index,
                   label_smoothing, z_loss, bool(return_grad), bool(inplace),
                   softcap=softcap, return_stats=return_stats, check_labels=check_labels)


def check_softcap(softcap) -> float:
    """``softcap``: None (no capping) or a finite real s > 0; returns s, or 0.0 for None."""
    if softcap is None:
        return 0.0
    s = _real(softcap, "softcap")
    if not (math.isfinite(s) and s > 0.0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    return s


def check_flag(v, name) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(v).__name__}")
    return bool(v)


def _real(v, name) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    return v


def label_error(flat_pos: int, value, lead_shape, c: int, ignore_index: int) -> ValueError:
    """The error for the first out-of-range label (row-major position ``flat_pos``)."""
    idx = tuple(int(i) for i in np.unravel_index(flat_pos, lead_shape)) if lead_shape else ()
    return ValueError(
        f"label {int(value)} at position {idx} is out of range: labels must be in [0, {c}) "
        f"or equal ignore_index={ignore_index}"
    )


INT64_MAX = 2**63 - 1


def check_uint64_labels(xp, target, args: SceArgs):
    """Raise for uint64 labels above int64's maximum, quoting the caller's value.

    The backends read labels as int64, where such a value would wrap to a negative
    number (and could then equal ignore_index); this check runs first, on the caller's
    array.  It looks at the values only for dtype uint64 (one ``max`` and, on CuPy, one
    sync); every other integer dtype fits int64 and costs nothing here.
    """
    if args.kind != "label" or np.dtype(target.dtype) != np.uint64 or target.size == 0:
        return
    if int(target.max()) <= INT64_MAX:
        return
    flat = target.ravel()
    pos = int(xp.flatnonzero(flat > np.uint64(INT64_MAX))[0])
    raise label_error(pos, int(flat[pos]), args.lead_shape, args.c, args.ignore_index)


def class_weight_error(pos: int, value: float) -> ValueError:
    """The error for the first class weight that is NaN or infinite."""
    return ValueError(f"class weights must be finite, got weight[{pos}] = {value}")


def first_bad_weight(xp, weight):
    """Index of the first class weight that is NaN or infinite, -1 when none, as a 0-d array
    of ``xp`` (on CuPy nothing is read back: the caller reads it when it may)."""
    if not is_float_dtype(weight.dtype):
        return xp.asarray(-1)
    bad = ~xp.isfinite(weight)
    return xp.where(bad.any(), xp.argmax(bad), -1)


def raise_bad_weight(weight, first):
    """Raise :func:`class_weight_error` when ``first`` (from :func:`first_bad_weight`, on the
    host or the device) names a weight; one read of it."""
    pos = int(first)
    if pos >= 0:
        raise class_weight_error(pos, float(weight[pos]))


def check_class_weight(xp, weight):
    """Raise ValueError unless every class weight is finite.

    Any finite weight is accepted, negative and zero ones included, as torch accepts them:
    the mean's denominator is then the (possibly negative) weight sum, and a zero sum gives
    the zero-denominator rule's 0 (see ``SceArgs.mean_scale``).  A NaN or infinite weight
    would make every result NaN.  NumPy checks here; CuPy arrays are checked on the device
    by the softmax cross-entropy kernels, which raise the same error from their one
    read-back after the last launch (no host sync before it).
    """
    if weight is None or weight.size == 0 or not isinstance(weight, np.ndarray):
        return
    raise_bad_weight(weight, first_bad_weight(xp, weight))


def check_inplace_aliasing(xp, logits, target, weight, args: SceArgs):
    """With inplace=True the gradient overwrites the logits while the target and the weight
    are still being read: refuse a target or weight that shares memory with the logits."""
    if not args.inplace:
        return
    for arr, name in ((target, "target"), (weight, "weight")):
        if shares_memory(xp, logits, arr):
            raise ValueError(f"inplace=True needs a {name} that does not share memory with the "
                             f"logits (the gradient overwrites them); pass a copy of the {name}")


# -- the linear model (gpuce.linear and its dask form) -------------------------------------------

class ShapeOnly:
    """Shape and dtype of an array not yet allocated: the (N, C) logits of the linear model,
    which are never formed whole, described to :func:`sce_args`."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)


def check_chunk_size(chunk_size):
    """None (automatic) or a positive int."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size must be a positive integer or None, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return int(chunk_size)


def linear_args(xp, X, W, y, *, bias, reg, weight, chunk_size, check_finite, **sce_opts):
    """Every up-front check of linear_cross_entropy (in-memory or dask): returns
    ``(reg, chunk_size, args)`` with ``args`` the SceArgs of the whole N x C problem."""
    reg = check_linear_args(xp, X, W, y, bias, reg, check_finite)
    chunk_size = check_chunk_size(chunk_size)
    args = sce_args(ShapeOnly((X.shape[0], W.shape[0]), X.dtype), y, weight=weight, inplace=False,
                    **sce_opts)
    return reg, chunk_size, args


def check_linear_args(xp, X, W, y, bias, reg, check_finite=True):
    """Validation for the linear model (shapes, dtypes, finiteness) before any work."""
    for a, name in ((X, "X"), (W, "W")):
        check_float(a, name)
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if X.dtype != W.dtype:
        raise TypeError(f"X and W must have the same dtype, got {X.dtype} and {W.dtype}")
    n, d = X.shape
    c, dw = W.shape
    if y.ndim not in (1, 2):
        raise ValueError(f"y must be (N,) integer labels or (N, C) probabilities, got shape {y.shape}")
    if d != dw:
        raise ValueError(f"X has {d} features but W has {dw} (W must be (C, D) = (classes, features))")
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} rows but X has {n}")
    if y.ndim == 2 and y.shape[1] != c:
        raise ValueError(f"probability targets y must have shape ({n}, {c}), got {y.shape}")
    if bias is not None:
        check_float(bias, "bias")
        if bias.shape != (c,):
            raise ValueError(f"bias must have shape ({c},), got {bias.shape}")
    reg = _real(reg, "reg")
    if not (np.isfinite(reg) and reg >= 0):
        raise ValueError(f"reg must be a finite number >= 0, got {reg}")
    if check_finite:
        for a, name in ((X, "X"), (W, "W"), (bias, "bias")):
            if a is not None and not all_finite(xp, a):
                raise ValueError(f"{name} contains NaN or infinity")
    return reg


# -- token log-probabilities and entropy (gpuce.tokens) ------------------------------------------

@dataclass(frozen=True)
class TokenArgs:
    """Normalised arguments of token_logprobs / linear_token_logprobs.  ``kind`` is always
    "label" (the label checks of the cross-entropy path read it)."""

    lead_shape: tuple  # logits.shape[:-1]
    n: int  # rows
    c: int  # classes
    acc: np.dtype
    temperature: float
    softcap: float  # 0.0 for none
    ignore_index: int
    return_entropy: bool
    return_grad: bool
    kind: str = "label"

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature


def check_temperature(temperature) -> float:
    """``temperature``: a finite real τ > 0."""
    t = _real(temperature, "temperature")
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return t


def token_args(logits, target, *, temperature, softcap, ignore_index, return_entropy,
               return_grad) -> TokenArgs:
    """Every up-front check of token_logprobs (``logits`` may be a :class:`ShapeOnly`)."""
    check_float(logits, "logits")
    c = logits.shape[-1]
    if c < 1:
        raise ValueError(f"logits must have at least one class along the last axis, got shape {logits.shape}")
    lead = tuple(logits.shape[:-1])
    if np.dtype(target.dtype).kind not in "iu":
        raise TypeError(f"target must be integer token ids (class labels), got {target.dtype}")
    if tuple(target.shape) != lead:
        raise ValueError(f"target must have shape logits.shape[:-1] = {lead}, got {tuple(target.shape)}")
    if isinstance(ignore_index, (bool, np.bool_)):
        raise TypeError("ignore_index must be an integer, got bool")
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}") from None
    return TokenArgs(lead, math.prod(lead), c, acc_dtype(logits.dtype),
                     check_temperature(temperature), check_softcap(softcap), ignore_index,
                     check_flag(return_entropy, "return_entropy"),
                     check_flag(return_grad, "return_grad"))


def check_row_grads(xp, args: TokenArgs, grad_logprobs, grad_entropy):
    """The incoming row gradients of token_logprobs' backward: None or real arrays of the
    rows' shape; returned as flat (N,) arrays in the accumulation dtype (None stays None)."""
    if (grad_logprobs is not None or grad_entropy is not None) and not args.return_grad:
        raise ValueError("grad_logprobs / grad_entropy are the incoming gradients of "
                         "return_grad=True; pass return_grad=True")
    out = []
    for g, name in ((grad_logprobs, "grad_logprobs"), (grad_entropy, "grad_entropy")):
        if g is not None:
            if not (is_float_dtype(g.dtype) or np.dtype(g.dtype).kind in "iu"):
                raise TypeError(f"{name} must be a real array, got {g.dtype}")
            if tuple(g.shape) != args.lead_shape:
                raise ValueError(f"{name} must have the rows' shape {args.lead_shape}, got {tuple(g.shape)}")
            g = xp.ascontiguousarray(g.reshape(-1).astype(args.acc, copy=False))
        out.append(g)
    return tuple(out)


# -- distillation (gpuce.distillation) -------------------------------------------------------------

@dataclass(frozen=True)
class DistillArgs:
    """Normalised arguments of distillation_loss / linear_distillation_loss."""

    lead_shape: tuple
    n: int
    c: int
    acc: np.dtype
    beta: float
    temperature: float
    softcap: float  # 0.0 for none
    ignore_index: int
    reduction: str
    return_grad: bool
    sparse: bool  # a top-k teacher (indices, log-probabilities)
    k: int = 0
    kind: str = "label"  # the label checks read it

    def mean_scale(self, denom) -> float:
        if self.reduction != "mean":
            return 1.0
        return 0.0 if denom == 0 else 1.0 / denom


def check_beta(beta) -> float:
    """Distillation's ``beta``: a real number in [0, 1]."""
    b = _real(beta, "beta")
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return b


def distill_args(student, teacher, target, *, beta, temperature, ignore_index, reduction,
                 softcap, return_grad) -> DistillArgs:
    """Every up-front check of distillation_loss; ``teacher`` an array (dense) or a pair
    ``(indices, log_probs)`` (sparse); ``student`` may be a :class:`ShapeOnly`."""
    check_float(student, "student_logits")
    c = student.shape[-1]
    if c < 1:
        raise ValueError(f"student_logits must have at least one class along the last axis, "
                         f"got shape {tuple(student.shape)}")
    lead = tuple(student.shape[:-1])
    sparse = isinstance(teacher, tuple)
    k = 0
    if sparse:
        if len(teacher) != 2:
            raise ValueError("a sparse teacher is a pair (indices, log_probs)")
        idx, lp = teacher
        if np.dtype(idx.dtype).kind not in "iu":
            raise TypeError(f"the sparse teacher's indices must be integers, got {idx.dtype}")
        check_float(lp, "the sparse teacher's log_probs")
        if tuple(idx.shape) != tuple(lp.shape) or tuple(idx.shape[:-1]) != lead:
            raise ValueError(f"the sparse teacher's indices and log_probs must both have shape "
                             f"{lead} + (k,), got {tuple(idx.shape)} and {tuple(lp.shape)}")
        k = idx.shape[-1]
    else:
        check_float(teacher, "teacher_logits")
        if tuple(teacher.shape) != tuple(student.shape):
            raise ValueError(f"student and teacher logits must have the same shape, got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    b = check_beta(beta)
    if sparse and b != 0.0:
        raise ValueError("a sparse (top-k) teacher takes beta = 0 (the forward KL over its "
                         f"support), got beta={beta}")
    t = check_temperature(temperature)
    check_reduction(reduction)
    if isinstance(ignore_index, (bool, np.bool_)):
        raise TypeError("ignore_index must be an integer, got bool")
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}") from None
    if target is not None:
        if np.dtype(target.dtype).kind not in "iu":
            raise TypeError(f"target must be integer labels (or None), got {target.dtype}")
        if tuple(target.shape) != lead:
            raise ValueError(f"target must have shape {lead}, got {tuple(target.shape)}")
    return DistillArgs(lead, math.prod(lead), c, acc_dtype(student.dtype), b, t,
                       check_softcap(softcap), ignore_index, reduction,
                       check_flag(return_grad, "return_grad"), sparse, k)
