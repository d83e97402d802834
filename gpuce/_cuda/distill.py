"""Fused distillation from dense teacher logits: host side of kernels/gpuce_distill.cu.

One launch reads each row of the student's and the teacher's logits once (the two-pass
kernel twice) and writes, per row, the loss (β = 0: KL(p_T ‖ p_S); β = 1: KL(p_S ‖ p_T), of
softmax(cap(·) / τ)) and with a gradient output σ_i ∂L_i/∂S once (in place over the student's
logits when the caller passes them as the output).  The formulas are in
kernels/gpuce_distill_policy.cuh's header; the array semantics are
:func:`gpuce._distill_rows.dense_rows`'s, which :func:`distill_rows_fused` matches.

The generalised JSD (0 < β < 1) needs both rows' log-sum-exps before its per-element terms and
a second reduction for its gradient, which no body of the fused kernels has:
:func:`distill_rows_fused` raises :class:`NotImplementedError` for it (the caller falls back to
the array path).  Rows whose two maxima lie too far apart for the kernels' one shift are
flagged by the kernel and recomputed here on the array path (rare; see the policy's header).

The kernels are cross-entropy's bodies run with another row-state policy that reads a second
stream, so the launch shapes are cross-entropy's for probability targets:
:func:`candidates` takes :func:`gpuce._cuda.fused.candidates` and keeps the plans this module
instantiates (warp and block teams, clusters of blocks on sm_90 for float accumulation, the
two-pass kernel; no tile and no register stage).  :func:`variants` is the one list of template
instantiations: the runtime builds its modules from it and the offline NVRTC test compiles
all of it.

CuPy is imported inside the functions that launch, so this module imports without a GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import fused as F
from .program import PolicyProgram

SOURCE = "gpuce_distill.cu"
PROGRAM_PREFIX = "gpuce_distill_"

KINDS = ("warp", "block", "cluster", "twopass")
BETAS = (0.0, 1.0)  # the fused β values; others raise NotImplementedError


@dataclass(frozen=True)
class DisVariant:
    """One template instantiation: kernel kind, logits dtype (student, teacher and gradient),
    pack width, lanes a row (warp), blocks a row (cluster)."""

    kind: str  # warp | block | cluster | twopass
    dtype: str
    vec: int
    group: int = 0
    cluster: int = 0

    @property
    def min_arch(self) -> int:
        return 90 if self.cluster else 80

    def expr(self) -> str:
        t, a = F.CT[self.dtype], F.CT[F.ACC[self.dtype]]
        head = f"{t}, {a}, {self.vec}"
        if self.kind == "warp":
            return f"gpuce::dis_team<{head}, {self.group}>"
        if self.kind == "block":
            return f"gpuce::dis_team<{head}, 0>"
        if self.kind == "cluster":
            return f"gpuce::dis_cluster<{head}, {self.cluster}>"
        return f"gpuce::dis_twopass<{head}>"

    def describe(self) -> str:
        extra = f"-G{self.group}" if self.kind == "warp" else f"-CL{self.cluster}" if self.cluster else ""
        return f"dis-{self.kind}{extra}-v{self.vec}"


def variants():
    """Every instantiation the distillation kernels may launch (the offline compile list): per
    dtype, the warp teams, the block team, the clusters (float accumulation) and the two-pass
    kernel at 16-byte packs, and the block and two-pass kernels a value a pack (rows of the
    teacher or the gradient at another offset in their 16-byte granules than the student's)."""
    out = []
    for dtype in F.DTYPES:
        vm = F.VEC_MAX[dtype]
        out += [DisVariant("warp", dtype, vm, group=g) for g in F.WARP_GROUPS]
        out.append(DisVariant("block", dtype, vm))
        if F.ACC[dtype] == "float32":
            out += [DisVariant("cluster", dtype, vm, cluster=cl) for cl in F.CLUSTERS]
        out.append(DisVariant("twopass", dtype, vm))
        out += [DisVariant("block", dtype, 1), DisVariant("twopass", dtype, 1)]
    return out


PROGRAM = PolicyProgram(SOURCE, PROGRAM_PREFIX, variants)


@dataclass(frozen=True)
class DisPlan:
    """A variant and its launch shape (cross-entropy's plan of the same kind for probability
    targets, whose ring holds two streams: threads, packs a thread P, ring stages S, dynamic
    shared memory, rows a block at a time)."""

    variant: DisVariant
    shape: F.Plan

    @property
    def threads(self) -> int:
        return self.shape.threads

    @property
    def smem(self) -> int:
        return self.shape.smem

    def describe(self) -> str:
        s = f"{self.variant.describe()} {self.shape.threads}t"
        if self.variant.kind in ("warp", "block", "cluster"):
            s += f" P{self.shape.packs} S{self.shape.stages}"
        return s + f" {self.shape.smem // 1024}KiB"


@functools.lru_cache(maxsize=4096)
def candidates(dtype: str, c: int, vec: int, dev: F.Device, shifted: bool = False) -> tuple:
    """Every :class:`DisPlan` that runs rows of ``c`` classes, the preferred first: the
    cross-entropy planner's plans for probability targets (two streams a ring; no tile, no
    register stage, no two-pass cluster) that :func:`variants` instantiates."""
    out = []
    for p in F.candidates(dtype, "prob", "int32", c, vec, dev, None, shifted, True):
        ce = p.variant
        if ce.kind not in KINDS or ce.regs or (ce.kind == "twopass" and ce.cluster):
            continue
        v = DisVariant(ce.kind, dtype, ce.vec, ce.group, ce.cluster)
        if v in PROGRAM.compiled:
            out.append(DisPlan(v, p))
    return tuple(out)


# ------------------------------------------------------------------------------------ runtime

# the program's compiled set, kernels, occupancy and offline compile (gpuce._cuda.program)
function = PROGRAM.function
_blocks_per_sm = PROGRAM.blocks_per_sm


def distill_rows_fused(S2, T2, args, active, loss_out, grad_out=None, row_scale=None) -> None:
    """:func:`gpuce._distill_rows.dense_rows` (CuPy arrays, ``xp`` implied) on the fused
    kernels, for β ∈ {0, 1}: the loss per row into ``loss_out`` and, with ``grad_out``,
    ∂(Σ σ_i L_i)/∂S (σ = ``row_scale``, an (N,) accumulation-dtype array or a number; None
    for 1) into it, rounded once to its dtype (it may be ``S2`` itself).

    ``S2``, ``T2``: (N, C) student and teacher logits of one dtype (float16, bfloat16, float32
    or float64), unit column stride; ``args``: a :class:`gpuce._validation.DistillArgs`
    (dense); ``active``: (N,) booleans (False: an ignored row, loss 0, zero gradient).
    Raises NotImplementedError for what the kernels do not do (0 < β < 1, a sparse teacher,
    mixed dtypes, a gradient of another dtype or layout): the caller falls back to
    dense_rows.  One launch, then (only when the kernel flagged rows) the array path on them.
    """
    import cupy

    beta = float(args.beta)
    if beta not in BETAS:
        raise NotImplementedError(f"the fused distillation kernels do β = 0 and β = 1, not β = {beta}")
    if getattr(args, "sparse", False):
        raise NotImplementedError("the fused distillation kernels take a dense teacher")
    n, c = S2.shape
    dtype = S2.dtype.name
    acc = np.dtype(args.acc)
    if dtype not in F.DTYPES or T2.dtype != S2.dtype or T2.shape != S2.shape:
        raise NotImplementedError(f"fused distillation: student {dtype} {S2.shape}, teacher "
                                  f"{T2.dtype.name} {T2.shape} (one dtype of {', '.join(F.DTYPES)}, one shape)")
    if acc.name != F.ACC[dtype]:
        raise NotImplementedError(f"fused distillation: {dtype} logits accumulate in {F.ACC[dtype]}, "
                                  f"got {acc.name}")
    if grad_out is not None and (grad_out.dtype != S2.dtype or grad_out.shape != (n, c)):
        raise NotImplementedError("fused distillation: the gradient is the student's dtype and shape")
    if n == 0:
        return
    if c > F.MAX_CLASSES:
        raise NotImplementedError(f"the fused kernels take at most {F.MAX_CLASSES} classes, got {c}")
    isz = S2.itemsize
    for a in (S2, T2) + ((grad_out,) if grad_out is not None else ()):
        if c > 1 and a.strides[1] != isz:
            raise NotImplementedError("fused distillation: rows must be contiguous (unit column stride)")
    at = acc.type
    act = None
    if active is not None:
        act = cupy.ascontiguousarray(cupy.asarray(active).reshape(n)).astype(cupy.uint8, copy=False)
    sig_rows = None
    scale = 1.0
    if row_scale is not None and getattr(row_scale, "ndim", 0) == 1:
        sig_rows = cupy.ascontiguousarray(cupy.asarray(row_scale).reshape(n)).astype(acc, copy=False)
    elif row_scale is not None:
        scale = float(row_scale)
    loss = loss_out
    if not (loss_out.dtype == acc and loss_out.ndim == 1 and loss_out.flags.c_contiguous):
        loss = cupy.empty(n, acc)
    redo = cupy.zeros(n, cupy.uint8)
    count = cupy.zeros(1, cupy.float64)

    lds, ldt = S2.strides[0] // isz, T2.strides[0] // isz
    pairs = [(S2, lds), (T2, ldt)]
    if grad_out is not None:
        pairs.append((grad_out, grad_out.strides[0] // isz))
    vec = F.vec_for(dtype, c, *pairs)
    dev = F.current_device()
    shifted = bool(F.rows_shifted(dtype, c, S2, lds) and vec > 1)
    p = candidates(dtype, c, vec, dev, shifted)[0]
    expr = p.variant.expr()
    fn = F._prepare(function(expr), p.smem)
    per_sm = _blocks_per_sm(F.device_id(), expr, p.threads, p.smem, p.shape)
    grid = F.grid_blocks(p.shape, n, dev, per_sm)
    cap = float(args.softcap or 0.0)
    ldg = grad_out.strides[0] // isz if grad_out is not None else 0
    kargs = (S2, np.int64(lds), T2, np.int64(ldt), act, np.int64(n), np.int32(c), at(cap),
             at(1.0 / args.temperature), np.int32(1 if beta == 1.0 else 0), at(scale), sig_rows, loss, redo,
             count, grad_out, np.int64(ldg), F.workspace(cupy))
    if p.variant.kind in ("warp", "block", "cluster"):
        kargs += (np.int32(p.shape.packs), np.int32(p.shape.stages))
    fn((grid,), (p.threads,), kargs, shared_mem=p.smem)
    if loss is not loss_out:
        loss_out[...] = loss
    if float(count.get()[0]) > 0:  # rows whose maxima lie too far apart for one shift
        from .. import _distill_rows

        rows = cupy.flatnonzero(redo)
        sub_loss = cupy.empty(rows.size, acc)
        sub_grad = None if grad_out is None else cupy.empty((rows.size, c), grad_out.dtype)
        sub_sig = sig_rows[rows] if sig_rows is not None else (row_scale if row_scale is not None else 1.0)
        # the kernel left these rows' gradient untouched: in place, S2's rows are still the logits
        _distill_rows.dense_rows(cupy, S2[rows], T2[rows], args, cupy.ones(rows.size, bool), sub_loss,
                                 sub_grad, sub_sig)
        loss_out[rows] = sub_loss
        if grad_out is not None:
            grad_out[rows] = sub_grad


# ------------------------------------------------------------------------------ offline compile

compile_all = PROGRAM.compile_all
