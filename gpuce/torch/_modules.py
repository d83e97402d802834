"""The nn.Module forms: CrossEntropyLoss and LinearCrossEntropyLoss."""

from __future__ import annotations

import math

import torch
from ._autograd import _legacy_reduction, _llm_options
from .._validation import check_reduction
from ._ce import cross_entropy
from ._lce import _options_ignored, linear_cross_entropy


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
        check_reduction(reduction)
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
