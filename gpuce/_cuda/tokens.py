"""Fused token log-probabilities and entropy: host side of kernels/gpuce_tokens.cu.

One launch reads each row of logits once (the two-pass kernel twice) and writes, per row, the
token's log-probability and the entropy of softmax(cap(f) / τ), and with a gradient output the
gradient of Σ_i g_l,i log p_i + g_H,i H_i, once (in place over the logits when the caller
passes them as the output).  The formulas are in kernels/gpuce_tokens_policy.cuh's header
(and gpuce._rowterms' token section, which the NumPy path follows).

The kernels are cross-entropy's bodies run with another row-state policy, so the launch
shapes are cross-entropy's: :func:`candidates` takes :func:`gpuce._cuda.fused.candidates`
for integer labels and keeps the plans this module instantiates (warp and block teams,
clusters of blocks on sm_90 for float accumulation, the two-pass kernel; no tile and no
register stage).  :func:`variants` is the one list of template instantiations: the runtime
builds its modules from it and the offline NVRTC test compiles all of it.

CuPy is imported inside the functions that launch, so this module imports without a GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import fused as F
from .program import PolicyProgram

SOURCE = "gpuce_tokens.cu"
PROGRAM_PREFIX = "gpuce_tokens_"

INDEXES = ("int32", "int64")
MAX_ROWS = 2**31 - 2  # the kernels' key packs row + 1 into 32 bits
KINDS = ("warp", "block", "cluster", "twopass")


@dataclass(frozen=True)
class TokVariant:
    """One template instantiation: kernel kind, logits dtype, label index dtype, the
    gradient's dtype (the logits' or the accumulation dtype), pack width, lanes a row (warp),
    blocks a row (cluster)."""

    kind: str  # warp | block | cluster | twopass
    dtype: str
    index: str  # "int32" | "int64"
    grad: str  # the gradient's dtype
    vec: int
    group: int = 0
    cluster: int = 0

    @property
    def min_arch(self) -> int:
        return 90 if self.cluster else 80

    def expr(self) -> str:
        t, i, a, d = F.CT[self.dtype], F.CT[self.index], F.CT[F.ACC[self.dtype]], F.CT[self.grad]
        head = f"{t}, {i}, {a}, {d}, {self.vec}"
        if self.kind == "warp":
            return f"gpuce::tok_team<{head}, {self.group}>"
        if self.kind == "block":
            return f"gpuce::tok_team<{head}, 0>"
        if self.kind == "cluster":
            return f"gpuce::tok_cluster<{head}, {self.cluster}>"
        return f"gpuce::tok_twopass<{head}>"

    def describe(self) -> str:
        extra = f"-G{self.group}" if self.kind == "warp" else f"-CL{self.cluster}" if self.cluster else ""
        return f"tok-{self.kind}{extra}-v{self.vec}"


def variants():
    """Every instantiation the token kernels may launch (the offline compile list): per
    logits dtype, label dtype and gradient dtype, the warp teams, the block team, the
    clusters (float accumulation) and the two-pass kernel at 16-byte packs, and the block and
    two-pass kernels a value a pack (rows of the gradient at another offset in their 16-byte
    granules than the logits'; a gradient of another dtype than the logits is stored a value
    at a time and never needs them)."""
    out = []
    for dtype in F.DTYPES:
        vm = F.VEC_MAX[dtype]
        acc = F.ACC[dtype]
        grads = (dtype,) if acc == dtype else (dtype, acc)
        for index in INDEXES:
            for grad in grads:
                def v(kind, vec, **kw):
                    return TokVariant(kind, dtype, index, grad, vec, **kw)
                out += [v("warp", vm, group=g) for g in F.WARP_GROUPS]
                out.append(v("block", vm))
                if acc == "float32":
                    out += [v("cluster", vm, cluster=cl) for cl in F.CLUSTERS]
                out.append(v("twopass", vm))
                if grad == dtype:
                    out += [v("block", 1), v("twopass", 1)]
    return out


PROGRAM = PolicyProgram(SOURCE, PROGRAM_PREFIX, variants)


@dataclass(frozen=True)
class TokPlan:
    """A variant and its launch shape (cross-entropy's plan of the same kind: threads, packs a
    thread P, ring stages S, dynamic shared memory, rows a block at a time)."""

    variant: TokVariant
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
def candidates(dtype: str, index: str, grad: str, c: int, vec: int, dev: F.Device, shifted: bool = False) -> tuple:
    """Every :class:`TokPlan` that runs rows of ``c`` classes, the preferred first: the
    cross-entropy planner's plans for integer labels (:func:`gpuce._cuda.fused.candidates`,
    no tile, no register stage) that :func:`variants` instantiates.  ``vec``: the pack width
    the rows allow; ``shifted``: rows may start off a 16-byte boundary."""
    out = []
    for p in F.candidates(dtype, "label", index, c, vec, dev, None, shifted, True):
        ce = p.variant
        if ce.kind not in KINDS or ce.regs:
            continue
        v = TokVariant(ce.kind, dtype, index, grad, ce.vec, ce.group, ce.cluster)
        if v in PROGRAM.compiled:
            out.append(TokPlan(v, p))
    return tuple(out)


# ------------------------------------------------------------------------------------ runtime

# the program's compiled set, kernels, occupancy and offline compile (gpuce._cuda.program)
function = PROGRAM.function
_blocks_per_sm = PROGRAM.blocks_per_sm


def _check_ignore_index(ignore_index: int, c: int) -> None:
    """The kernels compare a label's lower 32 bits with ignore_index's: an ignore_index outside
    the int32 range whose lower 32 bits are a class in [0, C) would hide that class."""
    lo = ((int(ignore_index) + 2**31) % 2**32) - 2**31
    if lo != ignore_index and 0 <= lo < c:
        raise ValueError(f"ignore_index {ignore_index} is outside the int32 range and its lower 32 bits "
                         f"name class {lo} of {c}: the fused token kernels cannot tell them apart")


def _vector(cp, a, dtype, n):
    """``a`` as a contiguous (n,) array of ``dtype`` (a copy only where needed), or None."""
    if a is None:
        return None
    a = cp.ascontiguousarray(a.reshape(n))
    return a if a.dtype == dtype else a.astype(dtype)


def token_rows(x2, labels, *, acc, inv_temperature, softcap, ignore_index, logp_out, entropy_out,
               grad_out=None, g_logp=None, g_entropy=None) -> None:
    """Launch the fused token kernel on (n, C) logits ``x2`` (CuPy; float16, bfloat16,
    float32 or float64; rows may be strided, unit column stride) with (n,) int32/int64
    ``labels`` (in [0, C) or ``ignore_index``: the caller checks them first).

    Writes log p into ``logp_out`` and H into ``entropy_out`` ((n,) arrays of the accumulation
    dtype ``acc``; ``entropy_out`` may be None), and with ``grad_out`` ((n, C), x2's dtype or
    ``acc``, unit column stride; it may be ``x2`` itself) the gradient of
    Σ_i g_logp_i log p_i + g_entropy_i H_i (``g_logp``, ``g_entropy``: (n,) arrays, None for
    0).  ``inv_temperature`` is 1 / τ; ``softcap`` the cap s > 0, or None / 0 for none.
    One launch; nothing waits for the device.
    """
    import cupy

    n, c = x2.shape
    dtype = x2.dtype.name
    acc = np.dtype(acc)
    if dtype not in F.DTYPES:
        raise TypeError(f"token_rows: logits of dtype {dtype} (expected one of {', '.join(F.DTYPES)})")
    if acc.name != F.ACC[dtype]:
        raise TypeError(f"token_rows: {dtype} logits accumulate in {F.ACC[dtype]}, got acc={acc.name}")
    if n == 0:
        return
    if c == 0:  # every label is ignore_index (the caller checked them): zero rows
        logp_out[...] = 0
        if entropy_out is not None:
            entropy_out[...] = 0
        return
    if n > MAX_ROWS:
        raise ValueError(f"the fused token kernels take at most {MAX_ROWS} rows, got {n}")
    if c > F.MAX_CLASSES:
        raise ValueError(f"the fused token kernels take at most {F.MAX_CLASSES} classes, got {c}")
    _check_ignore_index(ignore_index, c)
    isz = x2.itemsize
    if c > 1 and x2.strides[1] != isz:
        raise ValueError("token_rows: the logits' rows must be contiguous (unit column stride)")
    grad = grad_out.dtype.name if grad_out is not None else dtype
    if grad_out is not None:
        if grad_out.shape != (n, c) or grad not in (dtype, acc.name):
            raise ValueError(f"token_rows: grad_out must be ({n}, {c}) of {dtype} or {acc.name}, got "
                             f"{grad_out.shape} {grad}")
        if c > 1 and grad_out.strides[1] != grad_out.itemsize:
            raise ValueError("token_rows: grad_out's rows must be contiguous (unit column stride)")
    index = labels.dtype.name
    if index not in INDEXES:
        labels = labels.astype(cupy.int64)
        index = "int64"
    labels = cupy.ascontiguousarray(labels.reshape(n))
    outs = {}  # an output that is not a contiguous vector is written to a copy, copied back

    def out_vector(a):
        if a is None:
            return None
        if a.dtype == acc and a.ndim == 1 and a.flags.c_contiguous:
            return a
        outs[id(a)] = (a, cupy.empty(n, acc))
        return outs[id(a)][1]

    logp = out_vector(logp_out)
    ent = out_vector(entropy_out)
    gl = _vector(cupy, g_logp, acc, n) if grad_out is not None else None
    gh = _vector(cupy, g_entropy, acc, n) if grad_out is not None else None

    ldx = x2.strides[0] // isz
    if grad_out is not None and grad == dtype:
        vec = F.vec_for(dtype, c, (x2, ldx), (grad_out, grad_out.strides[0] // isz))
    else:  # a gradient of another dtype is stored a value at a time: the logits alone decide
        vec = F.vec_for(dtype, c, (x2, ldx))
    dev = F.current_device()
    shifted = bool(F.rows_shifted(dtype, c, x2, ldx) and vec > 1)
    p = candidates(dtype, index, grad, c, vec, dev, shifted)[0]
    expr = p.variant.expr()
    fn = F._prepare(function(expr), p.smem)
    per_sm = _blocks_per_sm(F.device_id(), expr, p.threads, p.smem, p.shape)
    grid = F.grid_blocks(p.shape, n, dev, per_sm)
    at = acc.type
    cap = float(softcap or 0.0)
    ldg = grad_out.strides[0] // isz if grad_out is not None else 0  # in units of the logits' dtype
    args = (x2, np.int64(ldx), labels, np.int64(n), np.int32(c), at(cap), at(inv_temperature),
            np.int64(ignore_index), logp, ent, grad_out, np.int64(ldg), gl, gh, F.workspace(cupy))
    if p.variant.kind in ("warp", "block", "cluster"):
        args += (np.int32(p.shape.packs), np.int32(p.shape.stages))
    fn((grid,), (p.threads,), args, shared_mem=p.smem)
    for a, tmp in outs.values():
        a[...] = tmp


# ------------------------------------------------------------------------------ offline compile

compile_all = PROGRAM.compile_all
