"""``gpuce.explain``: which backend, path and kernel a softmax_cross_entropy call would take,
and why, without running it."""

from __future__ import annotations

import numpy as np

from ._backend import array_module, asarray, is_dask_array
from ._blocks import rows_viewable
from ._impl import auto_impl, check_impl, resolve_impl
from ._validation import sce_args


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
        path, the kernel variant with its launch shape (``gpuce._fused.explain``; it needs a
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
    a = sce_args(logits, target, **{**_defaults(), **options, "weight": weight,
                                      "return_grad": return_grad})
    lines = []
    walk = a.n and not rows_viewable(logits.shape, logits.strides)
    if xp is np:
        lines.append("backend: NumPy (the logits are a numpy.ndarray)")
        lines.append(f"path: gpuce._sce_numpy: chunked passes over the rows on the CPU, "
                     f"{a.acc.name} accumulation")
    else:
        lines.append("backend: CuPy (the logits are a cupy.ndarray)")
        chosen = resolve_impl(impl)
        why = (f"impl={impl!r}" if impl != "auto" else
               f"impl='auto' means {auto_impl()!r} here" + ("" if auto_impl() == "fused" else
                                                         " (set by gpuce.use_impl)"))
        if chosen == "fused" and a.kind == "prob" and target.dtype != logits.dtype:
            chosen = "portable"
            why += (f"; probability targets of {target.dtype} with {logits.dtype} logits are read "
                    f"in {a.acc.name} by the portable kernels")
        lines.append(f"path: {chosen} ({why})")
        if chosen == "fused" and walk:
            lines.append("kernel: chosen for each row block as for an (N, C) array of its rows")
        elif chosen == "fused" and a.n:
            from . import _fused

            x2 = logits.reshape(a.n, a.c)
            y2 = None
            if a.kind == "label":
                index = target.dtype.name
                if index not in ("int32", "int64") or (
                        index == "int32" and not -(2**31) <= a.ignore_index < 2**31):
                    index = "int64"
            else:
                index = "int32"
                y2 = target.reshape(x2.shape)
            lines.append("kernel: " + _fused.explain(x2, a.kind, index, y2, None, softcap=bool(a.softcap)))
    if walk:
        lines.append("the leading dimensions do not merge into one row axis: the rows are "
                     "walked in blocks (gpuce.sce.walk_blocks), one block copied at a time")
    if a.n == 0:
        lines.append("no rows: empty or zero results, nothing launched")
    return "\n".join(lines)


def _defaults():
    return dict(reduction="mean", ignore_index=-100, weight=None, label_smoothing=0.0,
                z_loss=0.0, return_grad=True, inplace=False, softcap=None, return_stats=False,
                check_labels=True)
