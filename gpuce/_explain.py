"""``gpuce.explain``: which backend, path and kernel a softmax_cross_entropy call would take,
and why, without running it."""

from __future__ import annotations

import numpy as np

from ._backend import array_module, asarray, is_dask_array
from ._blocks import rows_viewable
from ._impl import check_impl, resolve_impl
from ._rows import check_labels, explain_rows
from ._validation import check_uint64_labels, first_bad_weight, raise_bad_weight, sce_args


def explain(logits, target, *, impl="auto", return_grad=True, **options) -> str:
    """Say which backend, path and (on the GPU) fused kernel variant
    ``softmax_cross_entropy(logits, target, impl=impl, return_grad=return_grad, **options)``
    would take, and why.  The arguments are checked as the call checks them (same errors);
    no loss is computed, nothing is launched.

    Parameters
    ----------
    logits, target, impl, return_grad, **options
        As :func:`gpuce.softmax_cross_entropy` (``reduction``, ``weight``,
        ``label_smoothing``, ``softcap``, ...).

    Returns
    -------
    str
        A few lines: the backend, the path and the reasons.  On CuPy arrays with the fused
        path, the kernel variant with its launch shape (``gpuce._cuda.fused.explain``; it needs a
        visible GPU to read the device's properties).

    Examples
    --------
    >>> import numpy as np, gpuce
    >>> print(gpuce.explain(np.zeros((4, 10), np.float32), np.zeros(4, np.int64)))
    backend: NumPy (the logits are a numpy.ndarray)
    path: gpuce._sce_numpy: chunked passes over the rows on the CPU, float32 accumulation
    """
    check_impl(impl)
    if is_dask_array(logits) or is_dask_array(target):
        blocks = getattr(logits, "numblocks", (1,))[0]
        meta = type(getattr(logits, "_meta", None))
        return (f"backend: dask ({blocks} row block(s) of {meta.__module__}.{meta.__name__} chunks)\n"
                f"path: gpuce._dask: one task per row block running the in-memory path of its "
                f"chunks' type (impl {resolve_impl(impl)!r} on CuPy chunks), a tree of tasks "
                f"adding the partials, one task applying the mean's scale")
    weight = options.get("weight")
    xp = array_module(logits, target, weight)
    logits, target, weight = (asarray(xp, v) for v in (logits, target, weight))
    args = sce_args(logits, target, **{**_defaults(), **options, "weight": weight,
                                       "return_grad": return_grad})
    # the value checks of the call too: uint64 labels, the class weights, the label range
    # (one read on CuPy each), so that explain raises exactly where the call would
    check_uint64_labels(xp, target, args)
    # (CuPy with check_labels=False reads nothing back: a bad weight gives NaN results there)
    if weight is not None and weight.size and (args.check_labels or xp is np):
        raise_bad_weight(weight, first_bad_weight(xp, weight))
    if args.kind == "label" and args.check_labels and args.n:
        check_labels(xp, target, args)
    walk = args.n and not rows_viewable(logits.shape, logits.strides)
    lines = explain_rows(xp, logits, target, args, impl, walk)
    if walk:
        lines.append("the leading dimensions do not merge into one row axis: the rows are "
                     "walked in blocks (gpuce.sce.walk_blocks), one block copied at a time")
    if args.n == 0:
        lines.append("no rows: empty or zero results, nothing launched")
    return "\n".join(lines)


def _defaults():
    return dict(reduction="mean", ignore_index=-100, weight=None, label_smoothing=0.0,
                z_loss=0.0, return_grad=True, inplace=False, softcap=None, return_stats=False,
                check_labels=True)
