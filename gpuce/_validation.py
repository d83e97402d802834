"""The one validation module: argument checks shared by both backends.

Every check raises a real exception (never ``assert``) with a message that says
what was expected and what came.  Checks here look only at metadata (dtype,
shape, Python scalars); value checks that need the data (the label range) are
done by each backend with :func:`label_error` formatting the message.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

REDUCTIONS = ("none", "sum", "mean")
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def acc_dtype(dtype) -> np.dtype:
    """Accumulation dtype: float32 for float16/float32 inputs, float64 for float64."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def check_float(x, name: str):
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d array")


def check_axis(axis, ndim: int) -> int:
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


def sce_args(logits, target, *, reduction, ignore_index, weight, label_smoothing, z_loss,
             return_grad, inplace) -> SceArgs:
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
    elif kind_char == "f":
        kind = "prob"
        if target.shape != logits.shape:
            raise ValueError(
                f"probability targets (float labels) must have the logits' shape {logits.shape}, "
                f"got {target.shape}"
            )
    else:
        raise TypeError(f"target must be integer class labels or float probabilities, got {target.dtype}")
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
        if np.dtype(weight.dtype).kind not in "fiu":
            raise TypeError(f"weight must be a real array, got {weight.dtype}")
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
    n = int(np.prod(lead, dtype=np.int64))
    return SceArgs(kind, lead, n, c, acc_dtype(logits.dtype), reduction, ignore_index,
                   label_smoothing, z_loss, bool(return_grad), bool(inplace))


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
