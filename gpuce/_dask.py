"""Dask arrays chunked by rows: the public functions over NumPy or CuPy chunks.

Row-wise functions (softmax, log_softmax, logsumexp, entropy, cross_entropy, kl_div) map
over the blocks: only the reduced axis must lie in one chunk.  softmax_cross_entropy also takes
logits chunked along the classes: its blocks' partial statistics (gpuce._partials) are combined
a row block at a time, and each gradient block is formed from the combined rows.  The losses
(softmax_cross_entropy, linear_cross_entropy) build one task per row block that computes the
block's loss sum, mean denominator and gradient sums with gpuce's in-memory path, a binary
tree of tasks that adds those partials, and one task that applies the reduction's scale (the
mean's denominator is only known once every block reported).  Small operands (W, bias, the
class weight) enter the graph once, as one key each, so a distributed scheduler ships them
to each worker once per call (per optimiser iteration in SoftmaxClassifier.fit).

Results are dask arrays: compute the loss and gradients together (``dask.compute(loss,
grads)``) so that the block tasks run once.  dask is imported only when a dask array is
passed in (``gpuce._backend.is_dask_array`` looks it up in ``sys.modules``).

SoftmaxClassifier's dask form lives here too (the end of this module): fit's one pass over
the data (checks, classes, class indices, persisted blocks), the lazy finiteness check of
the prediction methods and the labels of predicted class indices.  The classifier decides
the backend once per method (:func:`gpuce._dispatch.backend_of`) and hands itself in, so
this module never imports gpuce.classifier.
"""

from __future__ import annotations

import functools
from dataclasses import replace
import math
import sys
import uuid

import numpy as np

from . import _partials as partials
from . import _rowterms as rowterms
from ._backend import all_finite, array_module, is_cupy_array, is_dask_array
from ._impl import auto_impl, resolve_impl, use_impl
from ._rows import mean_denominator, sum_squares, weighted_z_loss
from ._results import LinearGrads, SceStats
from ._validation import (ShapeOnly, acc_dtype, check_axis, check_float, check_same_shape,
                          distill_args, label_error, linear_args, sce_args, token_args)


def _da():
    import dask.array as da

    return da


def _delayed():
    from dask import delayed

    return delayed


def _module_of(x):
    """numpy or cupy: the module of a dask array's chunks (or of an in-memory array)."""
    return array_module(x._meta if is_dask_array(x) else x)


def _meta(x, ndim, dtype):
    return _module_of(x).empty((0,) * ndim, dtype=dtype)


def _as_dask(a, like=None):
    if a is None or is_dask_array(a):
        return a
    da = _da()
    if like is None:
        return da.from_array(a, chunks=a.shape or ())
    chunks = (like.chunks[0],) + tuple((s,) for s in a.shape[1:])
    return da.from_array(a, chunks=chunks)


def _known_chunks(x, name):
    if x.ndim and any(math.isnan(c) for c in x.chunks[0]):
        raise ValueError(f"{name} has unknown chunk sizes; call {name}.compute_chunk_sizes() first")


def _rows_only(x, name, what="classes"):
    """Raise unless ``x`` is chunked along axis 0 only (each row whole in one chunk)."""
    _known_chunks(x, name)
    for ax in range(1, x.ndim):
        if x.numblocks[ax] != 1:
            last = ax == x.ndim - 1
            axis_name = f"the {what} axis (axis {ax})" if last else f"axis {ax}"
            raise ValueError(
                f"{name} is chunked along {axis_name} (chunks {x.chunks[ax]}); gpuce needs dask "
                f"arrays chunked by rows only, each row whole in one chunk: use "
                f"{name}.rechunk({{0: 'auto', {', '.join(f'{i}: -1' for i in range(1, x.ndim))}}})")


def _align_rows(t, x, name):
    """``t`` (dask or in-memory) as a dask array with ``x``'s row chunks."""
    if not is_dask_array(t):
        return _as_dask(t, like=x)
    _known_chunks(t, name)
    if t.shape[:1] != x.shape[:1]:
        return t  # the shape check that follows names the mismatch
    return t.rechunk((x.chunks[0],) + tuple((s,) for s in t.shape[1:]))


def _row_starts(x):
    return np.concatenate([[0], np.cumsum(x.chunks[0])[:-1]]).astype(int).tolist()


# operands at least this large are scattered to every worker up front when a distributed
# client is running (instead of travelling inside the task graph)
SCATTER_MIN_BYTES = 1 << 20


def _client():
    """The running dask.distributed client, or None (distributed is not imported here)."""
    dist = sys.modules.get("distributed")
    if dist is None:
        return None
    try:
        return dist.default_client()
    except ValueError:
        return None


def _constant(value, what):
    """An in-memory operand (W, bias, class weight) as one graph key: one transfer per worker
    and call.  With a distributed client and a large operand, broadcast to every worker
    first (``Client.scatter(..., broadcast=True)``)."""
    if value is None:
        return None
    if is_dask_array(value):
        value = value.compute()
    client = _client()
    if client is not None and getattr(value, "nbytes", 0) >= SCATTER_MIN_BYTES:
        return client.scatter(value, broadcast=True, hash=False)
    return _delayed()(value, name=f"gpuce-{what}-{uuid.uuid4().hex}")


def _call(fn, prefix, *args):
    return _delayed()(fn, pure=False)(*args, dask_key_name=f"gpuce-{prefix}-{uuid.uuid4().hex}")


# -- row-wise functions ------------------------------------------------------------------------

def map_rows(keep_axis: bool):
    """The dask form of a row-wise function ``fn(*arrays, axis=-1)`` (for
    :func:`gpuce._dispatch.backends`): map it block by block (the ``axis`` must lie in one
    chunk)."""

    def dask_form(fn, arguments):
        axis = arguments.pop("axis")
        return _map_along(fn, list(arguments.values()), axis, keep_axis)

    return dask_form


def _map_along(fn, arrays, axis, keep_axis):
    da = _da()
    first = next(a for a in arrays if is_dask_array(a))
    arrays = [a if is_dask_array(a) else _as_dask(a) for a in arrays]
    for a, name in zip(arrays, "xq" if len(arrays) == 2 else "x"):
        check_float(a, name)
    if len(arrays) == 2:
        check_same_shape(*arrays)
    axis = check_axis(axis, first.ndim)
    if arrays[0].numblocks[axis] != 1:
        raise ValueError(
            f"the dask array is chunked along axis {axis}, the axis {fn.__name__} reduces over "
            f"(chunks {arrays[0].chunks[axis]}); rechunk so that axis is whole: "
            f"x.rechunk({{{axis}: -1}})")
    arrays = [arrays[0]] + [a.rechunk(arrays[0].chunks) for a in arrays[1:]]
    xp = _module_of(arrays[0])
    probe = fn(*[xp.ones((1,) * a.ndim, a.dtype) for a in arrays], axis=axis)
    ndim = arrays[0].ndim - (0 if keep_axis else 1)
    return da.map_blocks(functools.partial(fn, axis=axis), *arrays, dtype=probe.dtype,
                         meta=_meta(arrays[0], ndim, probe.dtype),
                         drop_axis=[] if keep_axis else [axis], token=f"gpuce-{fn.__name__}")


# -- partial sums and their tree ---------------------------------------------------------------

def _check_block_labels(t, row0, args):
    """The label range check of one block, naming the position in the whole array."""
    if args.kind != "label" or t.size == 0:
        return
    bad = (t != args.ignore_index) & ((t < 0) | (t >= args.c))
    if bool(bad.any()):
        pos = int(bad.ravel().argmax())
        per_row = int(np.prod(args.lead_shape[1:], dtype=np.int64))
        raise label_error(row0 * per_row + pos, int(t.ravel()[pos]), args.lead_shape, args.c,
                            args.ignore_index)


def _block_denominator(t, w, args):
    return mean_denominator(array_module(t, w), t, w, args) if args.reduction == "mean" else 0.0


def _add(p, q):
    """Sum of two partial-result dicts (the arrays are added, None stays None)."""
    return {k: (None if p[k] is None else p[k] + q[k]) for k in p}


def _tree_sum(parts, keep):
    """Binary tree of additions over the partials' ``keep`` fields."""
    level = [_call(_select, "select", p, keep) for p in parts]
    while len(level) > 1:
        nxt = [_call(_add, "combine", level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _select(p, keep):
    return {k: p[k] for k in keep}


def _scaled(g, scale, dtype=None):
    """``g * scale`` in g's dtype, then rounded once to ``dtype`` (g's dtype if None): the
    partial gradients of float16/bfloat16 inputs arrive in float32 (see _acc_partials)."""
    if g is None:
        return None
    dtype = g.dtype if dtype is None else np.dtype(dtype)
    if scale != 1.0:
        g = g * g.dtype.type(scale)
    return g if g.dtype == dtype else g.astype(dtype)


def _acc_partials(dtype) -> bool:
    """True where block gradients are kept in float32 until scaled and summed: float16 and
    bfloat16 inputs, so that the reduction's scale and the sum over blocks round once."""
    return acc_dtype(dtype) != np.dtype(dtype)


def _from_parts(parts, field, shapes, dtype, meta_like, scale=None):
    da = _da()
    blocks = []
    for p, shape in zip(parts, shapes):
        v = p[field]
        if scale is not None or _acc_partials(dtype):
            v = _call(_scaled, "scale", v, 1.0 if scale is None else scale, dtype)
        blocks.append(da.from_delayed(v, shape=shape, dtype=dtype,
                                      meta=_meta(meta_like, len(shape), dtype)))
    return da.concatenate(blocks, axis=0)


# -- statistics (return_stats) -------------------------------------------------------------
# A block reports its statistics beside its loss: for "sum"/"mean" the z-loss part of its sum,
# its number of correct rows (rint(accuracy * counted), exact while a block has fewer than
# 2^22 rows) and of counted (non-ignored) rows, which the tree adds like the loss; for
# "none" its per-row values; always its per-row lse.

STAT_SUMS = ("z", "correct", "counted")


def _split_out(out, args):
    """(loss, grad or None, stats or None) of an in-memory call's return value."""
    out = out if isinstance(out, tuple) else (out,)
    return out[0], (out[1] if args.return_grad else None), (out[-1] if args.return_stats else None)


def _stats_part(t, st, args):
    if st is None:
        return {}
    if args.reduction == "none":
        return {"z_rows": st.z_loss, "acc_rows": st.accuracy, "lse": st.lse,
                "predicted": st.predicted}
    part = {"z": float(st.z_loss), "correct": 0.0, "counted": 0.0, "lse": st.lse,
            "predicted": st.predicted}
    if args.kind == "label":
        lab = t.ravel()
        if lab.dtype.kind == "u":
            lab = lab.astype(np.int64)
        counted = float((lab != args.ignore_index).sum())
        acc = float(st.accuracy)
        part["correct"] = float(np.rint(acc * counted)) if counted else 0.0
        part["counted"] = counted
    return part


def _stats_finish(total, args, scale):
    """The z-loss part and the accuracy of a "sum"/"mean" call (the lse stays per block)."""
    if not args.return_stats:
        return {}
    accuracy = None
    if args.kind == "label":
        accuracy = total["correct"] / total["counted"] if total["counted"] else math.nan
    return {"z_loss": total["z"] * scale, "accuracy": accuracy}


def _stats_arrays(parts, fin, args, lead_shapes, like):
    """The SceStats of dask arrays (per-row blocks, or 0-d from the finishing task)."""
    da = _da()
    lse = _from_parts(parts, "lse", lead_shapes, args.acc, like)
    predicted = _from_parts(parts, "predicted", lead_shapes, np.dtype(np.int64), like)
    if args.reduction == "none":
        z = _from_parts(parts, "z_rows", lead_shapes, args.acc, like)
        acc = (_from_parts(parts, "acc_rows", lead_shapes, args.acc, like)
               if args.kind == "label" else None)
        return SceStats(z, acc, lse, predicted)

    def scalar(key):
        value = _call(_as_acc, "stat", fin[key], args.acc, like._meta)
        return da.from_delayed(value, shape=(), dtype=args.acc, meta=_meta(like, 0, args.acc))

    return SceStats(scalar("z_loss"), scalar("accuracy") if args.kind == "label" else None, lse,
                    predicted)


def _as_acc(v, acc, meta):
    return array_module(meta).asarray(v, dtype=acc)


def _outputs(loss, grad, stats, args):
    out = (loss,) + ((grad,) if args.return_grad else ()) + ((stats,) if args.return_stats else ())
    return out if len(out) > 1 else loss


# -- softmax_cross_entropy ---------------------------------------------------------------------

def _sce_part(run, x, t, w, args, row0, opts, denominator=None):
    """One row block: ``run`` is the in-memory softmax_cross_entropy (gpuce.sce passes it, so
    this module never imports gpuce.sce).  ``denominator``: the whole call's denominator and
    row count, for the class-weighted z-loss coefficient (gpuce._rows.weighted_z_loss)."""
    if args.check_labels:
        _check_block_labels(t, row0, args)
    if denominator is not None:
        opts = _block_z_loss(opts, args, denominator)
    red = "none" if args.reduction == "none" else "sum"
    if args.return_grad and _acc_partials(x.dtype):
        x = x.astype(args.acc)  # exact; the gradient is rounded to x's dtype once, in _scaled
    out = run(x, t, weight=w, reduction=red, return_grad=args.return_grad,
              return_stats=args.return_stats, **opts)
    loss, g, st = _split_out(out, args)
    return {"loss": loss if red == "none" else loss.astype(np.float64),
            "denom": _block_denominator(t, w, args), "grad": g, **_stats_part(t, st, args)}


def _sce_finish(total, args):
    scale = args.mean_scale(total["denom"])
    loss = total["loss"].astype(np.float64) * scale
    return {"loss": _module_of(total["loss"]).asarray(loss, dtype=args.acc), "scale": scale,
            **_stats_finish(total, args, scale)}


def softmax_cross_entropy(run, logits, target, *, reduction, ignore_index, weight, label_smoothing,
                          z_loss, return_grad, inplace, impl, softcap=None, return_stats=False,
                          check_labels=True):
    """The dask form of gpuce.softmax_cross_entropy; ``run`` is its in-memory form, run on
    each row block with the impl in force now (:func:`gpuce.use_impl`)."""
    impl = resolve_impl(impl)
    if inplace:
        raise ValueError("inplace=True is not supported for dask arrays (their blocks are "
                         "computed lazily); use return_grad=True")
    logits = _as_dask(logits)
    _known_chunks(logits, "logits")
    if logits.ndim >= 2 and logits.numblocks[-1] > 1:  # the classes in several chunks
        return _class_chunked_sce(logits, target, reduction=reduction, ignore_index=ignore_index,
                                  weight=weight, label_smoothing=label_smoothing, z_loss=z_loss,
                                  return_grad=return_grad, softcap=softcap,
                                  return_stats=return_stats, check_labels=check_labels)
    _rows_only(logits, "logits")
    target = _align_rows(target, logits, "target")
    args = sce_args(logits, target, reduction=reduction, ignore_index=ignore_index, weight=weight,
                    label_smoothing=label_smoothing, z_loss=z_loss, return_grad=return_grad,
                    inplace=False, softcap=softcap, return_stats=return_stats,
                    check_labels=check_labels)
    _rows_only(target, "target")
    array_module(logits._meta, target._meta, weight)  # raises for NumPy mixed with CuPy
    opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                impl=impl, softcap=softcap, check_labels=check_labels)
    wd = _constant(weight, "weight")
    xs, ts = logits.to_delayed().ravel(), target.to_delayed().ravel()
    denominator = None
    if _weighted_z(args, weight):  # first, from the labels alone: the blocks' z-loss needs it
        denominator = _tree_sum([_call(_denominator_part, "denominator", tb, wd, args)
                                 for tb in ts], ("denom", "count"))
    parts = [_call(_sce_part, "sce-part", run, x, t, wd, args, r0, opts, denominator)
             for x, t, r0 in zip(xs, ts, _row_starts(logits))]
    lead_shapes = [(n,) + tuple(args.lead_shape[1:]) for n in logits.chunks[0]]
    grad_shapes = [s + (args.c,) for s in lead_shapes]
    fin = None
    if args.reduction == "none":
        loss = _from_parts(parts, "loss", lead_shapes, args.acc, logits)
        grad = _from_parts(parts, "grad", grad_shapes, logits.dtype, logits) if return_grad else None
    else:
        keep = ("loss", "denom") + (STAT_SUMS if args.return_stats else ())
        fin = _call(_sce_finish, "sce-finish", _tree_sum(parts, keep), args)
        loss = _da().from_delayed(fin["loss"], shape=(), dtype=args.acc,
                                  meta=_meta(logits, 0, args.acc))
        grad = (_from_parts(parts, "grad", grad_shapes, logits.dtype, logits, scale=fin["scale"])
                if return_grad else None)
    stats = _stats_arrays(parts, fin, args, lead_shapes, logits) if args.return_stats else None
    return _outputs(loss, grad, stats, args)


# -- softmax_cross_entropy over chunks of classes ---------------------------------------------------
# Logits chunked along the class axis (and the rows): each (row block, class block) reports its
# rows' partial statistics (gpuce._partials), one task a row block combines them in class
# order and forms the rows' loss terms, a tree adds the row blocks' sums, and each block's
# gradient is formed from its rows' combined statistics.  The block tasks run the array-
# generic code on the chunks' module (NumPy, or CuPy's portable path).

def _flat_rows(a, c):
    return a.reshape(-1, c) if c is not None else a.reshape(-1)


def _class_part(x, c0, t, y, w, args):
    xp = array_module(x)
    cb = x.shape[-1]
    wb = None if w is None else w[c0:c0 + cb].astype(args.acc, copy=False)
    return partials.block_partials(
        xp, _flat_rows(x, cb), c0, args, labels=None if t is None else _flat_rows(t, None),
        y=None if y is None else _flat_rows(y, cb), weight=wb)


def _class_rows(parts, t, args, row0):
    """A row block's combined statistics and its loss terms (z-loss apart: its coefficient
    may wait for the whole call's denominator), with the block's sums."""
    xp = array_module(parts[0]["m"])
    if t is not None and args.check_labels:
        _check_block_labels(t, row0, args)
    lab = None if t is None else _flat_rows(t, None)
    comb = partials.combine(xp, parts, args.acc)
    rows = partials.row_terms(xp, comb, args, labels=lab, z=0.0)
    active, bad = rows["active"], rows["bad"]
    counted = active & ~bad if args.kind == "label" else active
    if args.kind == "label":  # bad labels count as ignored in the denominator
        lbl = lab.astype(np.int64, copy=False)
        in_range = active & (lbl >= 0) & (lbl < args.c)
        denom = float(xp.where(in_range, comb["wk"], 0).sum(dtype=np.float64))
        count = float(in_range.sum())
        finite = xp.isfinite(comb["M"])
        correct = xp.where(active, (finite & in_range & (comb["t"] == comb["M"])).astype(args.acc),
                           args.acc.type(np.nan))
    else:
        denom = count = float(lab.size if lab is not None else comb["M"].size)
        correct = None
    lse2 = xp.where(active, rows["lse"] * rows["lse"], args.acc.type(0)).astype(args.acc)
    return {"loss0": rows["loss"], "lse": rows["lse"], "lse2": lse2, "wl": rows["wl"],
            "a": comb["a"], "active": active, "bad": bad, "imax": comb["imax"],
            "correct": correct, "counted_rows": counted,
            "loss_sum": float(rows["loss"].sum(dtype=np.float64)),
            "lse2_sum": float(lse2.sum(dtype=np.float64)), "denom": denom, "count": count,
            "n_correct": 0.0 if correct is None else float(xp.nansum(correct, dtype=np.float64)),
            "n_counted": float(active.sum()) if args.kind == "label" else 0.0}


def _class_scale(total, args, w):
    """(scale, z′): the reduction's scale and the z-loss coefficient of the whole call."""
    z = args.z_loss
    if args.reduction != "mean":
        return 1.0, z
    if z and w is not None and args.kind == "label":
        z = weighted_z_loss(z, total["denom"], total["count"])
    return args.mean_scale(total["denom"]), z


def _class_finish(total, args, w):
    """The loss, the statistics' sums, the scale and z′ of a "sum"/"mean" call."""
    scale, z = _class_scale(total, args, w)
    accuracy = total["n_correct"] / total["n_counted"] if total["n_counted"] else math.nan
    return {"loss": (total["loss_sum"] + z * total["lse2_sum"]) * scale, "scale": scale, "z": z,
            "z_loss": z * total["lse2_sum"] * scale, "accuracy": accuracy}


def _class_grad(x, c0, t, y, w, rows, fin, args, shape):
    xp = array_module(x)
    cb = x.shape[-1]
    scale, z = fin["scale"], fin["z"]
    lse = rows["lse"]
    G = rowterms.logit_grad_factor(rowterms.ArrayOps(xp, args.acc), rows["wl"], rows["a"],
                                      z, lse)
    r = {"lse": lse, "G": G, "wl": rows["wl"], "active": rows["active"], "bad": rows["bad"]}
    wb = None if w is None else w[c0:c0 + cb].astype(args.acc, copy=False)
    g = partials.block_grad(xp, _flat_rows(x, cb), c0, args, r, scale,
                     labels=None if t is None else _flat_rows(t, None),
                     y=None if y is None else _flat_rows(y, cb), weight=wb)
    return g.astype(x.dtype, copy=False).reshape(shape)  # rounded once


def _class_rows_out(rows, fin, key, args, shape):
    xp = array_module(rows["lse"])
    if key == "loss":
        v = rows["loss0"] + args.acc.type(fin["z"]) * rows["lse2"]
    elif key == "z":
        v = args.acc.type(fin["z"]) * rows["lse2"]
    elif key == "predicted":
        return rows["imax"].reshape(shape)
    else:
        v = rows[key]
    return xp.asarray(v, dtype=args.acc).reshape(shape)


def _class_chunked_sce(logits, target, *, reduction, ignore_index, weight, label_smoothing,
                       z_loss, return_grad, softcap, return_stats, check_labels):
    da = _da()
    args = sce_args(logits, target, reduction=reduction, ignore_index=ignore_index, weight=weight,
                    label_smoothing=label_smoothing, z_loss=z_loss, return_grad=return_grad,
                    inplace=False, softcap=softcap, return_stats=return_stats,
                    check_labels=check_labels)
    for ax in range(1, logits.ndim - 1):
        if logits.numblocks[ax] != 1:
            raise ValueError(
                f"logits is chunked along axis {ax} (chunks {logits.chunks[ax]}); with the "
                f"classes in several chunks only the first (rows) and last (classes) axes may "
                f"be chunked: rechunk axis {ax} whole")
    if is_dask_array(weight):
        weight = weight.compute()
    array_module(logits._meta, target._meta if is_dask_array(target) else target, weight)
    c = args.c
    row_chunks, class_chunks = logits.chunks[0], logits.chunks[-1]
    c0s = np.concatenate([[0], np.cumsum(class_chunks)[:-1]]).astype(int).tolist()
    if args.kind == "label":
        t = _align_rows(target, logits, "target")
        _rows_only(t, "target")
        ts, ys = list(t.to_delayed().ravel()), [None] * len(row_chunks)
    else:
        y = _as_dask(target)
        if y.shape != logits.shape:
            raise ValueError(f"probability targets must have the logits' shape {logits.shape}, "
                             f"got {y.shape}")
        y = y.rechunk(logits.chunks)
        ys = y.to_delayed().reshape(len(row_chunks), -1, len(class_chunks))[:, 0, :]
        ts = [None] * len(row_chunks)
    xs = logits.to_delayed().reshape(len(row_chunks), -1, len(class_chunks))[:, 0, :]
    wd = _constant(weight, "weight")
    row_starts = _row_starts(logits)
    rows = []
    for i in range(len(row_chunks)):
        parts = [_call(_class_part, "class-part", xs[i][j], c0s[j], ts[i],
                       None if ys[i] is None else ys[i][j], wd, args)
                 for j in range(len(class_chunks))]
        rows.append(_call(_class_rows, "class-rows", parts, ts[i], args, row_starts[i]))
    if args.reduction == "none":  # row-local: nothing waits for the other row blocks
        fin_d = {"scale": 1.0, "z": args.z_loss}
    else:
        keep = ("loss_sum", "lse2_sum", "denom", "count", "n_correct", "n_counted")
        fin_d = _call(_class_finish, "class-finish", _tree_sum(rows, keep), args, wd)
    lead = tuple(args.lead_shape[1:])
    lead_shapes = [(m,) + lead for m in row_chunks]

    def per_row(key, dtype=None):
        dtype = args.acc if dtype is None else np.dtype(dtype)
        blocks = [da.from_delayed(_call(_class_rows_out, "class-out", r, fin_d, key, args, shp),
                                  shape=shp, dtype=dtype, meta=_meta(logits, len(shp), dtype))
                  for r, shp in zip(rows, lead_shapes)]
        return da.concatenate(blocks, axis=0)

    def scalar(key):
        return da.from_delayed(_call(_as_acc, "class-scalar", fin_d[key], args.acc, logits._meta),
                               shape=(), dtype=args.acc, meta=_meta(logits, 0, args.acc))

    loss = per_row("loss") if args.reduction == "none" else scalar("loss")
    grad = None
    if return_grad:
        grid = []
        for i, m in enumerate(row_chunks):
            grid.append([da.from_delayed(
                _call(_class_grad, "class-grad", xs[i][j], c0s[j], ts[i],
                      None if ys[i] is None else ys[i][j], wd, rows[i], fin_d, args,
                      (m,) + lead + (cb,)),
                shape=(m,) + lead + (cb,), dtype=logits.dtype,
                meta=_meta(logits, logits.ndim, logits.dtype))
                for j, cb in enumerate(class_chunks)])
        grad = da.block(grid) if logits.ndim == 2 else da.concatenate(
            [da.concatenate(r, axis=-1) for r in grid], axis=0)
    stats = None
    if return_stats:
        lse = per_row("lse")
        predicted = per_row("predicted", np.int64)
        if args.reduction == "none":
            stats = SceStats(per_row("z"), per_row("correct") if args.kind == "label" else None,
                             lse, predicted)
        else:
            stats = SceStats(scalar("z_loss"), scalar("accuracy") if args.kind == "label" else None,
                             lse, predicted)
    return _outputs(loss, grad, stats, args)


# -- linear_cross_entropy ----------------------------------------------------------------------

def _denominator_part(y, w, args):
    """A label block's share of the mean's denominator and of its non-ignored rows (the
    class-weighted z-loss divides by their count: gpuce._rows.weighted_z_loss)."""
    xp = array_module(y, w)
    return {"denom": _block_denominator(y, w, args),
            "count": mean_denominator(xp, y, None, args) if args.kind == "label" else 0.0}


def _weighted_z(args, w):
    """Whether the z-loss coefficient depends on the whole call's denominator and row count
    ("mean" with class weights, z-loss and labels)."""
    return (args.reduction == "mean" and bool(args.z_loss) and w is not None
            and args.kind == "label")


def _block_z_loss(opts, args, denominator):
    """The blocks' options with the whole call's z-loss coefficient (weighted_z_loss)."""
    return dict(opts, z_loss=weighted_z_loss(args.z_loss, denominator["denom"],
                                             denominator["count"]))


def _linear_part(run, X, y, W, b, w, args, row0, opts, denominator=None):
    """One row block: ``run`` is the in-memory linear_cross_entropy (gpuce.linear passes it).
    For "mean", ``denominator`` is the whole call's (a tree over the label blocks, computed
    first): the block's chunks scale their gradient by it before rounding it to 16 bits, as
    the in-memory call does, and its loss sum, z-loss part and gradients come scaled."""
    if args.check_labels:
        _check_block_labels(y, row0, args)
    red = "none" if args.reduction == "none" else "sum"
    opts = dict(opts)
    if denominator is not None:
        red = "mean"
        opts["_denominator"] = denominator["denom"]
        if _weighted_z(args, w):
            opts = _block_z_loss(opts, args, denominator)
    with use_impl(opts.pop("impl")):  # the choice in force when the graph was built
        out = run(X, W, y, bias=b, weight=w, reduction=red, return_grad=args.return_grad,
                  _acc_grads=True, return_stats=args.return_stats, **opts)
    loss, g, st = _split_out(out, args)
    return {"loss": loss if red == "none" else loss.astype(np.float64),
            "dX": None if g is None else g.X, "dW": None if g is None else g.W,
            "db": None if g is None else g.bias, **_stats_part(y, st, args)}


def _linear_finish(total, W, args, reg):
    """The loss, dW and db from the blocks' sums (for "mean" already divided by the whole
    call's denominator in the blocks: nothing is scaled here)."""
    xp = array_module(W)
    scale = 1.0
    out = {"scale": scale}
    if args.reduction != "none":
        loss = xp.asarray(total["loss"].astype(np.float64) * scale, dtype=args.acc)
        if reg:
            loss = loss + args.acc.type(0.5 * reg) * sum_squares(xp, W).astype(args.acc)
        out["loss"] = loss
        out.update(_stats_finish(total, args, scale))
    if total.get("dW") is not None:  # accumulation dtype (float32 for float16/bfloat16)
        dW = _scaled(total["dW"], scale)
        dW = dW + dW.dtype.type(reg) * W.astype(dW.dtype, copy=False) if reg else dW
        out["dW"] = dW.astype(W.dtype, copy=False)  # rounded once
    if total.get("db") is not None:
        out["db"] = _scaled(total["db"], scale, W.dtype)
    return out


def linear_cross_entropy(run, X, W, y, *, bias, reg, reduction, ignore_index, weight, label_smoothing,
                         z_loss, return_grad, input_grad, check_finite, chunk_size, softcap=None,
                         return_stats=False, check_labels=True, grad_row_scale=None, _acc_grads=False,
                         _denominator=None):
    """The dask form of gpuce.linear_cross_entropy; ``run`` is its in-memory form, run on
    each row block (partial sums, accumulation-dtype gradients) with the impl in force now."""
    if grad_row_scale is not None:
        raise ValueError("grad_row_scale is not supported for dask arrays")
    da = _da()
    if is_dask_array(W) and W.ndim == 2 and W.numblocks[0] > 1:  # the classes in several chunks
        return _class_chunked_linear(
            X, W, y, bias=bias, reg=reg, reduction=reduction, ignore_index=ignore_index,
            weight=weight, label_smoothing=label_smoothing, z_loss=z_loss,
            return_grad=return_grad, input_grad=input_grad, check_finite=check_finite,
            chunk_size=chunk_size, softcap=softcap, return_stats=return_stats,
            check_labels=check_labels)
    W, bias, weight = (v.compute() if is_dask_array(v) else v for v in (W, bias, weight))
    X = _as_dask(X)
    _rows_only(X, "X", what="feature")
    y = _align_rows(y, X, "y")
    array_module(X._meta, y._meta, W, bias, weight)  # raises for NumPy mixed with CuPy
    reg, chunk_size, args = linear_args(  # check_finite runs in each block's task
        None, X, W, y, bias=bias, reg=reg, weight=weight, chunk_size=chunk_size,
        check_finite=False, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, return_grad=return_grad,
        softcap=softcap, return_stats=return_stats, check_labels=check_labels)
    _rows_only(y, "y")
    n, d = X.shape
    c = W.shape[0]
    opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                input_grad=input_grad, check_finite=check_finite, chunk_size=chunk_size,
                softcap=softcap, check_labels=check_labels, impl=auto_impl())
    Wd, bd, wd = _constant(W, "W"), _constant(bias, "bias"), _constant(weight, "weight")
    ys = y.to_delayed().ravel()
    denominator = None
    if args.reduction == "mean":  # first, from the labels alone: the blocks scale by it
        denominator = _tree_sum([_call(_denominator_part, "denominator", yb, wd, args)
                                 for yb in ys], ("denom", "count"))
    parts = [_call(_linear_part, "linear-part", run, xb, yb, Wd, bd, wd, args, r0, opts,
                   denominator)
             for xb, yb, r0 in zip(X.to_delayed().ravel(), ys, _row_starts(X))]
    keep = ()
    if args.reduction != "none":
        keep = ("loss",) + (STAT_SUMS if args.return_stats else ())
    if return_grad:
        keep += ("dW",) + (("db",) if bias is not None else ())
    fin = _call(_linear_finish, "linear-finish", _tree_sum(parts, keep), Wd, args, reg)
    if args.reduction == "none":
        loss = _from_parts(parts, "loss", [(m,) for m in X.chunks[0]], args.acc, X)
    else:
        loss = da.from_delayed(fin["loss"], shape=(), dtype=args.acc, meta=_meta(X, 0, args.acc))
    stats = (_stats_arrays(parts, fin, args, [(m,) for m in X.chunks[0]], X) if args.return_stats
             else None)
    if not return_grad:
        return _outputs(loss, None, stats, args)
    dW = da.from_delayed(fin["dW"], shape=W.shape, dtype=W.dtype, meta=_meta(X, 2, W.dtype))
    db = (da.from_delayed(fin["db"], shape=(c,), dtype=X.dtype, meta=_meta(X, 1, X.dtype))
          if bias is not None else None)
    # each block's dX is final (scaled in the block): it waits for no other block
    dX = (_from_parts(parts, "dX", [(m, d) for m in X.chunks[0]], X.dtype, X)
          if input_grad else None)
    return _outputs(loss, LinearGrads(dX, dW, db), stats, args)


# -- token log-probabilities and entropy (gpuce.tokens) ------------------------------------------
# Row-local: one task a row block runs the in-memory function, nothing is reduced over rows
# except the linear form's dW and db (the tree of sums, rounded once in the finishing task).

def _token_part(run, x, t, gl, gh, args, row0, opts):
    _check_block_labels(t, row0, args)
    opts = dict(opts)
    with use_impl(opts.pop("impl")):  # the choice in force when the graph was built
        out = run(x, t, grad_logprobs=gl, grad_entropy=gh, **opts)
    out = out if isinstance(out, tuple) else (out,)
    part = {"logp": out[0], "entropy": out[1] if args.return_entropy else None,
            "grad": out[-1] if args.return_grad else None}
    if args.return_grad and not hasattr(part["grad"], "shape"):  # LinearGrads
        g = part.pop("grad")
        part.update(dX=g.X, dW=g.W, db=g.bias)
    return part


def _token_inputs(x, name, t, grad_logprobs, grad_entropy):
    x = _as_dask(x)
    _rows_only(x, name, what="classes" if name == "logits" else "feature")
    t = _align_rows(t, x, "target")
    gl = None if grad_logprobs is None else _align_rows(grad_logprobs, x, "grad_logprobs")
    gh = None if grad_entropy is None else _align_rows(grad_entropy, x, "grad_entropy")
    return x, t, gl, gh


def _blocks_of(a, count):
    return [None] * count if a is None else list(a.to_delayed().ravel())


def _token_outputs(parts, args, lead_shapes, like, extra):
    out = (_from_parts(parts, "logp", lead_shapes, args.acc, like),)
    if args.return_entropy:
        out += (_from_parts(parts, "entropy", lead_shapes, args.acc, like),)
    out += extra
    return out[0] if len(out) == 1 else out


def token_logprobs(run, logits, target, *, temperature, return_entropy, softcap, ignore_index,
                   return_grad, grad_logprobs, grad_entropy, _labels_checked=False):
    """The dask form of gpuce.token_logprobs: the in-memory call on each row block."""
    logits, target, gl, gh = _token_inputs(logits, "logits", target, grad_logprobs, grad_entropy)
    args = token_args(logits, target, temperature=temperature, softcap=softcap,
                      ignore_index=ignore_index, return_entropy=return_entropy,
                      return_grad=return_grad)
    for a, name in ((target, "target"), (gl, "grad_logprobs"), (gh, "grad_entropy")):
        if a is not None:
            _rows_only(a, name)
    array_module(logits._meta, target._meta)  # raises for NumPy mixed with CuPy
    opts = dict(temperature=temperature, return_entropy=return_entropy, softcap=softcap,
                ignore_index=ignore_index, return_grad=return_grad, impl=auto_impl())
    k = logits.numblocks[0]
    parts = [_call(_token_part, "tokens-part", run, x, t, a, b, args, r0, opts)
             for x, t, a, b, r0 in zip(logits.to_delayed().ravel(), target.to_delayed().ravel(),
                                       _blocks_of(gl, k), _blocks_of(gh, k), _row_starts(logits))]
    lead_shapes = [(m,) + tuple(args.lead_shape[1:]) for m in logits.chunks[0]]
    extra = ()
    if return_grad:
        extra = (_from_parts(parts, "grad", [s + (args.c,) for s in lead_shapes], logits.dtype,
                             logits),)
    return _token_outputs(parts, args, lead_shapes, logits, extra)


def _token_linear_finish(total, W):
    out = {}
    if total.get("dW") is not None:
        out["dW"] = total["dW"].astype(W.dtype, copy=False)  # rounded once
    if total.get("db") is not None:
        out["db"] = total["db"].astype(W.dtype, copy=False)
    return out


def linear_token_logprobs(run, X, W, target, *, bias, temperature, return_entropy, softcap,
                          ignore_index, chunk_size, return_grad, input_grad, grad_logprobs,
                          grad_entropy, check_finite, _acc_grads=False, _labels_checked=False):
    """The dask form of gpuce.linear_token_logprobs: the in-memory call on each row block
    (accumulation-dtype gradients), dW and db summed by a tree and rounded once."""
    da = _da()
    W, bias = (v.compute() if is_dask_array(v) else v for v in (W, bias))
    X, target, gl, gh = _token_inputs(X, "X", target, grad_logprobs, grad_entropy)
    array_module(X._meta, target._meta, W, bias)  # raises for NumPy mixed with CuPy
    if target.ndim != 1:
        raise ValueError(f"target must be (N,) integer tokens, got shape {target.shape}")
    n, d = X.shape
    c = W.shape[0]
    args = token_args(ShapeOnly((n, c), X.dtype), target, temperature=temperature,
                      softcap=softcap, ignore_index=ignore_index, return_entropy=return_entropy,
                      return_grad=return_grad)
    opts = dict(W=_constant(W, "W"), bias=_constant(bias, "bias"), temperature=temperature,
                return_entropy=return_entropy, softcap=softcap, ignore_index=ignore_index,
                chunk_size=chunk_size, return_grad=return_grad, input_grad=input_grad,
                check_finite=check_finite, _acc_grads=True, impl=auto_impl())
    k = X.numblocks[0]
    parts = [_call(_token_part, "linear-tokens-part", _linear_tokens_call(run), x, t, a, b, args,
                   r0, opts)
             for x, t, a, b, r0 in zip(X.to_delayed().ravel(), target.to_delayed().ravel(),
                                       _blocks_of(gl, k), _blocks_of(gh, k), _row_starts(X))]
    lead_shapes = [(m,) for m in X.chunks[0]]
    extra = ()
    if return_grad:
        keep = ("dW",) + (("db",) if bias is not None else ())
        fin = _call(_token_linear_finish, "linear-tokens-finish", _tree_sum(parts, keep), W)
        dW = da.from_delayed(fin["dW"], shape=W.shape, dtype=W.dtype, meta=_meta(X, 2, W.dtype))
        db = (da.from_delayed(fin["db"], shape=(c,), dtype=W.dtype, meta=_meta(X, 1, W.dtype))
              if bias is not None else None)
        dX = (_from_parts(parts, "dX", [(m, d) for m in X.chunks[0]], X.dtype, X)
              if input_grad else None)
        extra = (LinearGrads(dX, dW, db),)
    return _token_outputs(parts, args, lead_shapes, X, extra)


def _linear_tokens_call(run):
    """``run(X_block, target_block, W=..., ...)`` as linear_token_logprobs(X, W, target, ...)."""
    return functools.partial(_run_linear_tokens, run)


def _run_linear_tokens(run, x, t, *, W, **opts):
    return run(x, W, t, **opts)


# -- linear_cross_entropy with W chunked by classes ---------------------------------------------
# Each (row block of X, class block of W) task forms its logits a chunk at a time and reports the
# packed partials of its rows (gpuce._vocab, as a rank of a vocabulary-parallel head does); one
# task a row block combines them in class order; each (row block, class block) task then forms
# its gradient block again from the combined rows, its share of dX (summed over the class blocks)
# and its part of dW_j and db_j (summed over the row blocks), each sum rounded once.

def _lin_class_part(X, Wj, b, w, c0, t, args, chunk_size):
    xp = array_module(X)
    cb = Wj.shape[0]
    bj = None if b is None else b[c0:c0 + cb]
    wj = None if w is None else w[c0:c0 + cb]
    from . import _vocab

    return _vocab.linear_local_partials(xp, X, xp.ascontiguousarray(Wj), bj, c0,
                                        replace(args, n=X.shape[0], lead_shape=(X.shape[0],)),
                                        t, chunk_size, wj)


def _lin_class_rows(packed, t, args, row0):
    from . import _vocab

    xp = array_module(packed[0])
    return _class_rows(_vocab.unpack(xp, xp.stack(packed), args.acc), t, args, row0)


def _lin_class_grad(X, Wj, b, w, c0, t, rows, fin, args, chunk_size, input_grad):
    from . import _vocab

    xp = array_module(X)
    cb = Wj.shape[0]
    bj = None if b is None else b[c0:c0 + cb]
    wj = None if w is None else w[c0:c0 + cb]
    G = rowterms.logit_grad_factor(rowterms.ArrayOps(xp, args.acc), rows["wl"], rows["a"],
                                   fin["z"], rows["lse"])
    r = {"lse": rows["lse"], "G": G, "wl": rows["wl"], "active": rows["active"],
         "bad": rows["bad"]}
    dX, dW, db = _vocab.linear_local_grads(
        xp, X, xp.ascontiguousarray(Wj), bj, c0,
        replace(args, n=X.shape[0], lead_shape=(X.shape[0],)), t, r,
        args.acc.type(fin["scale"]), chunk_size, input_grad=input_grad, weight=wj)
    return {"dX": dX, "dW": dW, "db": db}


def _sum_in_order(values):
    out = values[0]
    for v in values[1:]:
        out = out + v
    return out


def _lin_class_dx(parts, dtype):
    return _sum_in_order([p["dX"] for p in parts]).astype(dtype)  # rounded once


def _lin_class_dw(parts, Wj, reg, key, dtype):
    total = _sum_in_order([p[key] for p in parts])
    if key == "dW" and reg:
        total = total + total.dtype.type(reg) * Wj.astype(total.dtype)
    return total.astype(dtype)  # rounded once


def _lin_class_finish(total, args, w, sumsq, reg):
    out = _class_finish(total, args, w)
    if reg:
        out["loss"] = out["loss"] + 0.5 * reg * float(sumsq)
    return out


def _sumsq_blocks(*blocks):
    return float(sum(float(sum_squares(array_module(b), b)) for b in blocks))


def _class_chunked_linear(X, W, y, *, bias, reg, reduction, ignore_index, weight, label_smoothing,
                          z_loss, return_grad, input_grad, check_finite, chunk_size, softcap,
                          return_stats, check_labels):
    """linear_cross_entropy with W (C, D) a dask array chunked by classes (rows of W), X
    chunked by rows (or in memory), labels or probability targets."""
    da = _da()
    bias, weight = (v.compute() if is_dask_array(v) else v for v in (bias, weight))
    X = _as_dask(X)
    _rows_only(X, "X", what="feature")
    _rows_only(W, "W", what="feature")
    _known_chunks(W, "W")
    y = _align_rows(y, X, "y") if y.ndim == 1 else _as_dask(y)
    array_module(X._meta, y._meta, W._meta, bias, weight)
    reg, chunk_size, args = linear_args(
        None, X, W, y, bias=bias, reg=reg, weight=weight, chunk_size=chunk_size,
        check_finite=False, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, return_grad=return_grad,
        softcap=softcap, return_stats=return_stats, check_labels=check_labels)
    if check_finite:
        for a, name in ((X, "X"), (W, "W")):
            if not bool(da.isfinite(a).all().compute()):
                raise ValueError(f"{name} contains NaN or infinity")
        if bias is not None and not all_finite(array_module(bias), bias):
            raise ValueError("bias contains NaN or infinity")
    n, d = X.shape
    c = W.shape[0]
    class_chunks = W.chunks[0]
    c0s = np.concatenate([[0], np.cumsum(class_chunks)[:-1]]).astype(int).tolist()
    label = args.kind == "label"
    if label:
        ts = [[t] * len(class_chunks) for t in y.to_delayed().ravel()]
    else:
        y = y.rechunk((X.chunks[0], class_chunks))
        ts = [list(r) for r in y.to_delayed()]
    xs = list(X.to_delayed().ravel())
    ws = list(W.to_delayed().ravel())
    bd, wd = _constant(bias, "bias"), _constant(weight, "weight")
    row_starts = _row_starts(X)
    rows = []
    for i, xb in enumerate(xs):
        packed = [_call(_lin_class_part, "lin-class-part", xb, ws[j], bd, wd, c0s[j], ts[i][j],
                        args, chunk_size) for j in range(len(ws))]
        rows.append(_call(_lin_class_rows, "lin-class-rows", packed, ts[i][0] if label else None,
                          args, row_starts[i]))
    if args.reduction == "none":
        fin_d = {"scale": 1.0, "z": args.z_loss}
    else:
        keep = ("loss_sum", "lse2_sum", "denom", "count", "n_correct", "n_counted")
        sumsq = _call(_sumsq_blocks, "lin-class-sumsq", *ws) if reg else 0.0
        fin_d = _call(_lin_class_finish, "lin-class-finish", _tree_sum(rows, keep), args, wd,
                      sumsq, reg)
    lead_shapes = [(m,) for m in X.chunks[0]]

    def per_row(key, dtype=None):
        dtype = args.acc if dtype is None else np.dtype(dtype)
        return da.concatenate([
            da.from_delayed(_call(_class_rows_out, "lin-class-out", r, fin_d, key, args, shp),
                            shape=shp, dtype=dtype, meta=_meta(X, 1, dtype))
            for r, shp in zip(rows, lead_shapes)], axis=0)

    def scalar(key):
        return da.from_delayed(_call(_as_acc, "lin-class-scalar", fin_d[key], args.acc, X._meta),
                               shape=(), dtype=args.acc, meta=_meta(X, 0, args.acc))

    loss = per_row("loss") if args.reduction == "none" else scalar("loss")
    grads = None
    if return_grad:
        parts = [[_call(_lin_class_grad, "lin-class-grad", xs[i], ws[j], bd, wd, c0s[j], ts[i][j],
                        rows[i], fin_d, args, chunk_size, input_grad)
                  for j in range(len(ws))] for i in range(len(xs))]
        dX = None
        if input_grad:
            dX = da.concatenate([
                da.from_delayed(_call(_lin_class_dx, "lin-class-dx", parts[i], X.dtype),
                                shape=(m, d), dtype=X.dtype, meta=_meta(X, 2, X.dtype))
                for i, m in enumerate(X.chunks[0])], axis=0)
        dW = da.concatenate([
            da.from_delayed(_call(_lin_class_dw, "lin-class-dw", [p[j] for p in parts], ws[j], reg,
                                  "dW", W.dtype),
                            shape=(cb, d), dtype=W.dtype, meta=_meta(X, 2, W.dtype))
            for j, cb in enumerate(class_chunks)], axis=0)
        db = None
        if bias is not None:
            db = da.concatenate([
                da.from_delayed(_call(_lin_class_dw, "lin-class-db", [p[j] for p in parts], None,
                                      0.0, "db", X.dtype),
                                shape=(cb,), dtype=X.dtype, meta=_meta(X, 1, X.dtype))
                for j, cb in enumerate(class_chunks)], axis=0)
        grads = LinearGrads(dX, dW, db)
    stats = None
    if return_stats:
        lse, predicted = per_row("lse"), per_row("predicted", np.int64)
        if args.reduction == "none":
            stats = SceStats(per_row("z"), per_row("correct") if label else None, lse, predicted)
        else:
            stats = SceStats(scalar("z_loss"), scalar("accuracy") if label else None, lse,
                             predicted)
    return _outputs(loss, grads, stats, args)


# -- distillation (gpuce.distillation) ----------------------------------------------------------------
# Row blocks of the student (the teacher's rows aligned with them): for "mean" the whole call's
# count of counted rows first (a tree over the target's blocks), which every block divides its
# loss sum and gradient by before rounding, as the in-memory call does.

def _distill_count(t, ignore_index):
    if t is None:
        return {"count": 0.0}
    t = t.ravel()
    return {"count": float((t.astype(np.int64) != ignore_index).sum())}


def _distill_part(run, s, t_logits, t_idx, t_lp, target, args, opts, count, linear):
    if args.reduction == "mean":
        denom = count["count"] if target is not None else float(args.n)
        opts = dict(opts, _denominator=denom)
    opts = dict(opts)
    with use_impl(opts.pop("impl")):  # the choice in force when the graph was built
        if linear:
            out = run(s, opts.pop("W_student"), t_logits, opts.pop("W_teacher"), target, **opts)
        else:
            teacher = t_logits if t_idx is None else (t_idx, t_lp)
            out = run(s, teacher, target, **opts)
    loss, g = (out if args.return_grad else (out, None))
    part = {"loss": loss if args.reduction == "none" else loss.astype(np.float64), "grad": g}
    if linear and g is not None:
        part.update(dX=g.X, dW=g.W, db=g.bias, grad=None)
    return part


def _distill_inputs(student, name, teacher, target):
    student = _as_dask(student)
    _rows_only(student, name, what="classes" if name == "student_logits" else "feature")
    if isinstance(teacher, tuple):
        teacher = tuple(_align_rows(a, student, "teacher") for a in teacher)
    else:
        teacher = _align_rows(teacher, student, "teacher")
    if target is not None:
        target = _align_rows(target, student, "target")
    return student, teacher, target


def _distill_graph(run, student, teacher, target, args, opts, linear):
    da = _da()
    k = student.numblocks[0]
    ts = _blocks_of(target, k)
    count = {"count": 0.0}
    if args.reduction == "mean" and target is not None:
        count = _tree_sum([_call(_distill_count, "distill-count", t, args.ignore_index)
                           for t in ts], ("count",))
    if isinstance(teacher, tuple):
        tl, ti, tp = [None] * k, _blocks_of(teacher[0], k), _blocks_of(teacher[1], k)
    else:
        tl, ti, tp = _blocks_of(teacher, k), [None] * k, [None] * k
    opts = dict(opts, impl=auto_impl())  # the choice in force now, applied by each block
    parts = [_call(_distill_part, "distill-part", run, s, a, b, c_, t, args, dict(opts), count,
                   linear)
             for s, a, b, c_, t in zip(student.to_delayed().ravel(), tl, ti, tp, ts)]
    lead_shapes = [(m,) + tuple(args.lead_shape[1:]) for m in student.chunks[0]]
    if args.reduction == "none":
        loss = _from_parts(parts, "loss", lead_shapes, args.acc, student)
    else:
        total = _tree_sum(parts, ("loss",))
        loss = da.from_delayed(_call(_as_acc, "distill-total", total["loss"], args.acc,
                                     student._meta),
                               shape=(), dtype=args.acc, meta=_meta(student, 0, args.acc))
    return parts, loss, lead_shapes


def distillation_loss(run, student_logits, teacher_logits, target, *, beta, temperature,
                      ignore_index, reduction, softcap, return_grad, grad_row_scale,
                      _denominator=None, _labels_checked=False):
    """The dask form of gpuce.distillation_loss: the in-memory call on each row block."""
    if grad_row_scale is not None:
        raise ValueError("grad_row_scale is not supported for dask arrays")
    S, T, target = _distill_inputs(student_logits, "student_logits", teacher_logits, target)
    args = distill_args(S, T, target, beta=beta, temperature=temperature,
                        ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                        return_grad=return_grad)
    opts = dict(beta=beta, temperature=temperature, ignore_index=ignore_index,
                reduction=reduction, softcap=softcap, return_grad=return_grad)
    parts, loss, lead_shapes = _distill_graph(run, S, T, target, args, opts, linear=False)
    if not return_grad:
        return loss
    grad = _from_parts(parts, "grad", [s + (args.c,) for s in lead_shapes], S.dtype, S)
    return loss, grad


def linear_distillation_loss(run, X_student, W_student, X_teacher, W_teacher, target, *,
                             bias_student, bias_teacher, chunk_size, beta, temperature,
                             ignore_index, reduction, softcap, return_grad, input_grad,
                             check_finite, grad_row_scale, _denominator=None, _acc_grads=False,
                             _labels_checked=False):
    """The dask form of gpuce.linear_distillation_loss: the in-memory call on each row block
    (accumulation-dtype gradients), dW and db summed by a tree and rounded once."""
    if grad_row_scale is not None:
        raise ValueError("grad_row_scale is not supported for dask arrays")
    da = _da()
    W_student, W_teacher, bias_student, bias_teacher = (
        v.compute() if is_dask_array(v) else v
        for v in (W_student, W_teacher, bias_student, bias_teacher))
    Xs, Xt, target = _distill_inputs(X_student, "X_student", X_teacher, target)
    _rows_only(Xt, "X_teacher", what="feature")
    n, c = Xs.shape[0], W_student.shape[0]
    args = distill_args(ShapeOnly((n, c), Xs.dtype), ShapeOnly((n, c), Xt.dtype), target,
                        beta=beta, temperature=temperature, ignore_index=ignore_index,
                        reduction=reduction, softcap=softcap, return_grad=return_grad)
    opts = dict(W_student=_constant(W_student, "W-student"),
                W_teacher=_constant(W_teacher, "W-teacher"),
                bias_student=_constant(bias_student, "b-student"),
                bias_teacher=_constant(bias_teacher, "b-teacher"), chunk_size=chunk_size,
                beta=beta, temperature=temperature, ignore_index=ignore_index,
                reduction=reduction, softcap=softcap, return_grad=return_grad,
                input_grad=input_grad, check_finite=check_finite, _acc_grads=True)
    parts, loss, _ = _distill_graph(run, Xs, Xt, target, args, opts, linear=True)
    if not return_grad:
        return loss
    keep = ("dW",) + (("db",) if bias_student is not None else ())
    fin = _call(_token_linear_finish, "distill-finish", _tree_sum(parts, keep), W_student)
    dW = da.from_delayed(fin["dW"], shape=W_student.shape, dtype=W_student.dtype,
                         meta=_meta(Xs, 2, W_student.dtype))
    db = (da.from_delayed(fin["db"], shape=(c,), dtype=W_student.dtype,
                          meta=_meta(Xs, 1, W_student.dtype)) if bias_student is not None else None)
    dX = (_from_parts(parts, "dX", [(m, Xs.shape[1]) for m in Xs.chunks[0]], Xs.dtype, Xs)
          if input_grad else None)
    return loss, LinearGrads(dX, dW, db)


# -- SoftmaxClassifier -------------------------------------------------------------------------

def compute(*values):
    """``dask.compute(*values)``: one graph for several results (their shared blocks run once)."""
    import dask

    return dask.compute(*values)


def _class_index(block, classes):
    """Class indices of a block of labels (a dask map_blocks function; all labels are known)."""
    xp = array_module(block)
    return xp.searchsorted(xp.asarray(classes), block).astype(np.int64)


def _class_of(idx, classes):
    """Labels of a block of class indices."""
    if is_cupy_array(idx) and classes.dtype.kind in "OUS":
        return classes[idx.get()]
    xp = array_module(idx)
    return xp.asarray(classes)[idx]


def _finite_block(block):
    """A dask map_blocks check: the block itself, or ValueError if it holds NaN or inf."""
    if not all_finite(array_module(block), block):
        raise ValueError("X contains NaN or infinity")
    return block


def classifier_prepare(est, X, y):
    """SoftmaxClassifier.fit's first step on dask arrays chunked by rows (``est`` the
    estimator, whose checks run here): one pass for the finiteness check and the classes,
    then X and the class indices persisted (on the workers of a distributed cluster) for
    the optimiser's iterations.  Returns ``(xp, X, y_idx, classes)``, ``xp`` the module of
    X's chunks."""
    import dask

    da = _da()
    if est.solver != "lbfgs":
        raise ValueError(f"solver={est.solver!r} needs in-memory arrays; dask arrays are "
                         "fitted with solver='lbfgs'")
    _, xp, X = est._validate_X(_as_dask(X), reset=True)
    _rows_only(X, "X", what="feature")
    if y is None:
        est._check_y_shape(X, None)
    y = est._check_y_shape(X, _align_rows(y, X, "y"))
    finite, classes = dask.compute(da.isfinite(X).all(), da.unique(y))
    if not bool(finite):
        raise ValueError("X contains NaN or infinity")
    est._check_classes(classes)
    y_idx = y.map_blocks(_class_index, classes, dtype=np.int64)
    if _module_of(y_idx) is not xp:  # host labels beside CuPy chunks of X
        y_idx = y_idx.map_blocks(xp.asarray, dtype=np.int64, meta=xp.empty(0, np.int64))
    X, y_idx = dask.persist(X, y_idx)
    return xp, X, y_idx, classes


def classifier_finite(X):
    """X with each block checked for NaN and inf when it is computed (the prediction
    methods: fit checks X in its one pass)."""
    return X.map_blocks(_finite_block, dtype=X.dtype, meta=X._meta)


def classifier_labels(idx, classes):
    """The labels of dask class indices, block by block."""
    return idx.map_blocks(_class_of, classes, dtype=classes.dtype)


def classifier_module(X):
    """numpy or cupy: the module of a dask X's chunks."""
    return _module_of(X)
