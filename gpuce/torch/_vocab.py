"""Vocabulary-parallel cross-entropy over torch.distributed: ``cross_entropy(...,
process_group=group)`` and ``linear_cross_entropy(..., process_group=group)``; token
log-probabilities and entropy the same way, ``token_logprobs(..., process_group=group)``
(an (N, 4) all-gather: m, s, h, t, 32 bytes a row from each rank; no collective backward).

Each rank holds a contiguous block of the classes, in rank order (rank r holds classes
[Σ_{q<r} C_q, Σ_{q≤r} C_q); the blocks may be uneven: their sizes are gathered once per group
and local size, and cached).  The forward computes the rank's partial row statistics over its
block (gpuce._partials), exchanges them in ONE collective, an all-gather of an (N, 7) float64
array (56 bytes a row from each rank), and combines them on every rank in rank order, so the
loss has the same bits on every rank.  The backward forms the local gradient block from the
combined rows with no collective, except the linear head's dX, which is a sum over the ranks
(one all-reduce of N x D, as a column-parallel head needs).

These run eagerly (``torch.autograd.Function``; ``torch.compile`` breaks the graph around
them).  The per-row lse of ``return_stats`` carries no gradient here.  Probability targets and
class weights are not differentiable in this mode (RuntimeError when they require grad).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _results
from .. import _vocab as V
from .._backend import array_module
from .._rows import check_labels
from .._validation import ShapeOnly, check_class_weight, check_uint64_labels, sce_args, token_args
from ._bridge import _to_array, _to_tensor

_SIZES: dict = {}


def shard_sizes(group, c_local: int, device) -> tuple:
    """The class counts of every rank of ``group`` (one all-gather the first time a group is
    seen with this local size; cached after)."""
    key = (id(group), c_local)
    sizes = _SIZES.get(key)
    if sizes is None:
        t = torch.tensor([c_local], dtype=torch.int64, device=device)
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, t, group=group)
        sizes = tuple(int(v.item()) for v in out)
        _SIZES[key] = sizes
    return sizes


def _gather(packed_array, group, device):
    """The one collective of the forward: every rank's packed partials, (H, N, 7)."""
    t = _to_tensor(packed_array).to(device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return _to_array(torch.stack(out))


def _check_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group needs an initialised torch.distributed "
                           "(torch.distributed.init_process_group)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, got "
                        f"{type(group).__name__}")


def _layout(group, c_local, device):
    sizes = shard_sizes(group, c_local, device)
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def _global_args(n, c, dtype, target_array, prob, reduction, ignore_index, label_smoothing,
                 z_loss, softcap, return_stats, check_labels_flag):
    tgt = ShapeOnly((n, c), target_array.dtype) if prob else target_array
    return sce_args(ShapeOnly((n, c), dtype), tgt, reduction=reduction,
                    ignore_index=ignore_index, weight=None, label_smoothing=label_smoothing,
                    z_loss=z_loss, return_grad=True, inplace=False, softcap=softcap,
                    return_stats=return_stats, check_labels=check_labels_flag)


def _check_inputs(xp, args, target, weight):
    """Every rank checks the same global labels before the collective: a bad label raises
    the same ValueError everywhere, never a hang."""
    check_class_weight(xp, weight)
    if args.kind == "label" and args.n:
        check_uint64_labels(xp, target, args)
        if args.check_labels:
            check_labels(xp, target, args)


def _stats(res, args, like):
    if not args.return_stats:
        return None
    z = _to_tensor(res["z_total"]).to(like.dtype)
    acc = None if res["accuracy"] is None else _to_tensor(res["accuracy"])
    return _results.SceStats(z, acc, _to_tensor(res["rows"]["lse"]),
                             _to_tensor(res["predicted"]))


def _token_args(xp, xa, ta, c, opts):
    """The token rows' arguments over the global C; every rank checks the same global tokens
    before the collective, so a bad one raises everywhere and no rank hangs."""
    n = xa.shape[0]
    args = token_args(ShapeOnly((n, c), xa.dtype), ta, return_entropy=True, return_grad=True, **opts)
    if n:
        check_uint64_labels(xp, ta, args)
        check_labels(xp, ta, args)
    return args


def _row_grads(args, *grads):
    """The incoming gradients as arrays of the accumulation dtype (None stays None)."""
    tdt = torch.float64 if args.acc.itemsize == 8 else torch.float32
    return tuple(None if g is None else _to_array(g.detach().to(tdt).contiguous()) for g in grads)


class _VocabCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, target, weight, opts, group, holder):
        xa, ta, wa = _to_array(x2), _to_array(target), _to_array(weight)
        xp = array_module(xa)
        n, c_local = x2.shape
        c0, c = _layout(group, c_local, x2.device)
        prob = target.is_floating_point()
        args = _global_args(n, c, xa.dtype, ta, prob, **opts)
        _check_inputs(xp, args, ta, wa)
        packed = V.local_partials(xp, xa, c0, args, ta, wa)
        res = V.combine_rows(xp, _gather(packed, group, x2.device), args,
                             None if prob else ta, weighted=weight is not None)
        ctx.save_for_backward(x2, target, weight)
        ctx.state = (c0, args, res["rows"], res["scale"])
        loss = _to_tensor(res["loss"]).to(x2.dtype)  # rounded once from the accumulation dtype
        holder["stats"] = _stats(res, args, x2)  # made under no_grad: no gradient
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x2, target, weight = ctx.saved_tensors
        c0, args, rows, scale = ctx.state
        xa, ta, wa = _to_array(x2), _to_array(target), _to_array(weight)
        xp = array_module(xa)
        g, = _row_grads(args, grad_loss)
        sig = g.reshape(-1) if args.reduction == "none" else g * args.acc.type(scale)
        out = V.local_grad(xp, xa, c0, args, rows, sig, ta, wa)
        return _to_tensor(out.astype(xa.dtype, copy=False)), None, None, None, None, None


def cross_entropy(x, target, weight, group, *, reduction, ignore_index, label_smoothing,
                  z_loss, softcap, return_stats, check_labels):
    """The vocabulary-parallel form of gpuce.torch.cross_entropy, classes last in ``x``."""
    _check_group(group)
    prob = target.is_floating_point()
    if torch.is_grad_enabled() and ((prob and target.requires_grad)
                                    or (weight is not None and weight.requires_grad)):
        raise RuntimeError("with process_group, the target and the class weight are not "
                           "differentiable: pass target.detach() / weight.detach()")
    c_local = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, c_local)
    t2 = target.reshape(-1, c_local) if prob else target.reshape(-1)
    opts = dict(reduction=reduction, ignore_index=ignore_index,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                return_stats=return_stats, check_labels_flag=check_labels)
    holder = {}
    loss = _VocabCE.apply(x2, t2, weight, opts, group, holder)
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_stats:
        return loss
    st = holder["stats"]
    lse = st.lse.reshape(lead)
    acc = st.accuracy.reshape(lead) if (st.accuracy is not None and reduction == "none") else st.accuracy
    z = st.z_loss.reshape(lead) if reduction == "none" else st.z_loss
    return loss, _results.SceStats(z, acc, lse, st.predicted.reshape(lead))


def _head_grads(dX, dW, db, x, w, bias, group):
    """(dX, dW, db) tensors of a column-parallel head from this rank's arrays: dX (None when
    not wanted) is this rank's share G W_local, summed over the ranks by the backward's one
    collective."""
    gx = None
    if dX is not None:
        gx = _to_tensor(dX).to(x.device)
        dist.all_reduce(gx, op=dist.ReduceOp.SUM, group=group)
        gx = gx.to(x.dtype)
    gw = _to_tensor(dW).to(w.dtype)
    gb = None if db is None else _to_tensor(db).to(bias.dtype)
    return gx, gw, gb


class _VocabLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, target, ce_weight, opts, chunk_size, group, holder):
        xa, wa, ba, ta, cwa = (_to_array(v) for v in (x, w, bias, target, ce_weight))
        xp = array_module(xa)
        n = x.shape[0]
        c0, c = _layout(group, w.shape[0], x.device)
        args = _global_args(n, c, xa.dtype, ta, False, **opts)
        _check_inputs(xp, args, ta, cwa)
        wa = xp.ascontiguousarray(wa)
        packed = V.linear_local_partials(xp, xa, wa, ba, c0, args, ta, chunk_size, cwa)
        res = V.combine_rows(xp, _gather(packed, group, x.device), args, ta,
                             weighted=ce_weight is not None)
        ctx.save_for_backward(x, w, bias, target, ce_weight)
        ctx.state = (c0, args, res["rows"], res["scale"], chunk_size, group)
        holder["stats"] = _stats(res, args, x)  # made under no_grad: no gradient
        return _to_tensor(res["loss"]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        x, w, bias, target, ce_weight = ctx.saved_tensors
        c0, args, rows, scale, chunk_size, group = ctx.state
        xa, wa, ba, ta, cwa = (_to_array(v) for v in (x, w, bias, target, ce_weight))
        xp = array_module(xa)
        g, = _row_grads(args, grad_loss)
        sig = g.reshape(-1) if args.reduction == "none" else g * args.acc.type(scale)
        want_x = ctx.needs_input_grad[0]
        dX, dW, db = V.linear_local_grads(xp, xa, xp.ascontiguousarray(wa), ba, c0, args, ta,
                                          rows, sig, chunk_size, input_grad=want_x,
                                          weight=cwa)
        return _head_grads(dX, dW, db, x, w, bias, group) + (None,) * 6


def linear_cross_entropy(x, w, target, bias, ce_weight, group, *, reduction, ignore_index,
                         label_smoothing, z_loss, softcap, return_stats, check_labels,
                         chunk_size):
    """The vocabulary-parallel form of gpuce.torch.linear_cross_entropy: ``w`` (C_local, D)
    and ``bias`` (C_local,) this rank's rows of the head; ``x`` (..., D) replicated;
    ``target`` (...) global class indices; ``ce_weight`` this rank's block of the class
    weights."""
    _check_group(group)
    if target.is_floating_point():
        raise ValueError("linear_cross_entropy with process_group takes class-index targets")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    t2 = target.reshape(-1)
    opts = dict(reduction=reduction, ignore_index=ignore_index,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                return_stats=return_stats, check_labels_flag=check_labels)
    holder = {}
    loss = _VocabLinearCE.apply(x2, w, bias, t2, ce_weight, opts, chunk_size, group, holder)
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_stats:
        return loss
    st = holder["stats"]
    z = st.z_loss.reshape(lead) if reduction == "none" else st.z_loss
    acc = st.accuracy.reshape(lead) if reduction == "none" else st.accuracy
    return loss, _results.SceStats(z, acc, st.lse.reshape(lead), st.predicted.reshape(lead))


class _VocabTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, target, opts, group):
        xa, ta = _to_array(x2), _to_array(target)
        xp = array_module(xa)
        c0, c = _layout(group, x2.shape[1], x2.device)
        args = _token_args(xp, xa, ta, c, opts)
        packed = V.token_local_partials(xp, xa, c0, args, ta)
        rows = V.token_combine_rows(xp, _gather(packed, group, x2.device), args, ta)
        ctx.set_materialize_grads(False)  # None for an output that is not used
        ctx.save_for_backward(x2, target)
        ctx.state = (c0, args, rows)
        return _to_tensor(rows["logp"]), _to_tensor(rows["entropy"])

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        x2, target = ctx.saved_tensors
        c0, args, rows = ctx.state
        xa, ta = _to_array(x2), _to_array(target)
        xp = array_module(xa)
        out = V.token_local_grad(xp, xa, c0, args, rows, ta, *_row_grads(args, grad_logp, grad_entropy))
        return _to_tensor(out.astype(xa.dtype, copy=False)), None, None, None


def token_logprobs(x, target, group, *, temperature, softcap, ignore_index, return_entropy):
    """The vocabulary-parallel form of gpuce.torch.token_logprobs, classes last in ``x`` (this
    rank's block); ``target`` the global tokens, the same on every rank."""
    _check_group(group)
    c_local = x.shape[-1]
    lead = x.shape[:-1]
    opts = dict(temperature=temperature, softcap=softcap or None, ignore_index=ignore_index)
    logp, ent = _VocabTokens.apply(x.reshape(-1, c_local), target.reshape(-1), opts, group)
    logp, ent = logp.reshape(lead), ent.reshape(lead)
    return (logp, ent) if return_entropy else logp


class _VocabLinearTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, target, opts, chunk_size, group):
        xa, wa, ba, ta = (_to_array(v) for v in (x, w, bias, target))
        xp = array_module(xa)
        c0, c = _layout(group, w.shape[0], x.device)
        args = _token_args(xp, xa, ta, c, opts)
        wa = xp.ascontiguousarray(wa)
        packed = V.token_linear_local_partials(xp, xa, wa, ba, c0, args, ta, chunk_size)
        rows = V.token_combine_rows(xp, _gather(packed, group, x.device), args, ta)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, w, bias, target)
        ctx.state = (c0, args, rows, chunk_size, group)
        return _to_tensor(rows["logp"]), _to_tensor(rows["entropy"])

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        none = (None,) * 7
        if grad_logp is None and grad_entropy is None:
            return none
        x, w, bias, target = ctx.saved_tensors
        c0, args, rows, chunk_size, group = ctx.state
        xa, wa, ba, ta = (_to_array(v) for v in (x, w, bias, target))
        xp = array_module(xa)
        dX, dW, db = V.token_linear_local_grads(xp, xa, xp.ascontiguousarray(wa), ba, c0, args, ta,
                                                rows, *_row_grads(args, grad_logp, grad_entropy),
                                                chunk_size, input_grad=ctx.needs_input_grad[0])
        return _head_grads(dX, dW, db, x, w, bias, group) + none[3:]


def linear_token_logprobs(x, w, target, bias, group, *, temperature, softcap, ignore_index,
                          return_entropy, chunk_size):
    """The vocabulary-parallel form of gpuce.torch.linear_token_logprobs: ``w`` (C_local, D)
    and ``bias`` (C_local,) this rank's rows of the head, ``x`` (N, D) replicated, ``target``
    the global tokens."""
    _check_group(group)
    opts = dict(temperature=temperature, softcap=softcap or None, ignore_index=ignore_index)
    logp, ent = _VocabLinearTokens.apply(x, w, bias, target, opts, chunk_size, group)
    return (logp, ent) if return_entropy else logp
