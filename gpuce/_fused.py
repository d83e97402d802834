"""Fused softmax cross-entropy (``impl="fused"``): host side of kernels/gpuce_sce_fused.cu.

One launch reads each row of logits once and writes loss, lse and the gradient once:

``regs``     G lanes per row (several rows per warp for tiny C), the row in registers;
``smem``     one block per row, the row cached in shared memory (C * itemsize bytes);
``cluster``  sm_90: a thread-block cluster of CL blocks per row, the row spread over their
             shared memories, partials exchanged through distributed shared memory;
``twopass``  one block per row reading the row twice (online max / sum-exp, then the
             gradient) -- only where none of the single-read variants fits.

:func:`variants` is the one list of template instantiations: the runtime builds its
RawModules from it and the offline NVRTC test compiles all of it.  :func:`choose`
picks the variant for a shape and device; the benchmark reports which one ran.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import _kernel_source

SOURCE = "gpuce_sce_fused.cu"

CT = {"float16": "__half", "float32": "float", "float64": "double", "int32": "int", "int64": "long long"}
ACC = {"float16": "float32", "float32": "float32", "float64": "float64"}
VEC_MAX = {"float16": 8, "float32": 4, "float64": 2}  # 16-byte packs
REGS_SHAPES = ((4, 1), (8, 1), (16, 1), (32, 1), (32, 2), (32, 4), (32, 8))  # (G lanes, ITEMS)
CLUSTERS = (2, 4, 8)
REGS_THREADS = 256


@dataclass(frozen=True)
class Variant:
    kind: str  # regs | smem | cluster | twopass
    dtype: str  # logits dtype
    label: str  # "int32" | "int64" | "prob"
    vec: int
    items: int = 0  # regs
    group: int = 0  # regs
    cluster: int = 0  # cluster

    @property
    def min_arch(self) -> int:
        return 90 if self.kind == "cluster" else 80

    def expr(self) -> str:
        t, a = CT[self.dtype], CT[ACC[self.dtype]]
        i = CT["int32"] if self.label == "prob" else CT[self.label]
        mode = 1 if self.label == "prob" else 0
        head = f"gpuce::sce_{self.kind}<{t}, {i}, {a}, {mode}, {self.vec}"
        if self.kind == "regs":
            return f"{head}, {self.items}, {self.group}>"
        if self.kind == "cluster":
            return f"{head}, {self.cluster}>"
        return f"{head}>"

    def capacity(self) -> int:
        """Largest C the regs variant holds (0 for the others)."""
        return self.group * self.items * self.vec if self.kind == "regs" else 0

    def describe(self) -> str:
        extra = {"regs": f"G{self.group}xI{self.items}", "cluster": f"CL{self.cluster}"}.get(self.kind, "")
        return f"{self.kind}{'-' + extra if extra else ''}-v{self.vec}"


def variants():
    """Every instantiation gpuce may launch."""
    out = []
    for dtype in ("float16", "float32", "float64"):
        for label in ("int32", "int64", "prob"):
            for vec in sorted({1, VEC_MAX[dtype]}):
                for g, items in REGS_SHAPES:
                    out.append(Variant("regs", dtype, label, vec, items, g))
                out.append(Variant("smem", dtype, label, vec))
                out.append(Variant("twopass", dtype, label, vec))
                for cl in CLUSTERS:
                    out.append(Variant("cluster", dtype, label, vec, cluster=cl))
    return out


@dataclass(frozen=True)
class Device:
    """What the chooser needs to know about the GPU."""

    arch: int  # e.g. 90
    sms: int
    smem_optin: int  # max dynamic shared memory per block, bytes


def choose(dtype: str, label: str, c: int, vec: int, dev: Device) -> Variant:
    """The single-read variant for a row of ``c`` classes if one fits, else ``twopass``."""
    itemsize = np.dtype(dtype).itemsize
    for g, items in REGS_SHAPES:
        if g * items * vec >= c:
            return Variant("regs", dtype, label, vec, items, g)
    budget = dev.smem_optin - 1024  # static scratch of the kernel
    if c * itemsize <= budget:
        return Variant("smem", dtype, label, vec)
    if dev.arch >= 90:
        for cl in CLUSTERS:
            per = -(-c // (cl * vec)) * vec
            if per * itemsize <= budget:
                return Variant("cluster", dtype, label, vec, cluster=cl)
    return Variant("twopass", dtype, label, vec)


def block_threads(v: Variant, c: int) -> int:
    if v.kind == "regs":
        return REGS_THREADS
    cols = c if v.kind != "cluster" else -(-c // v.cluster)
    packs = -(-cols // v.vec)
    # about 4 packs per thread, 128..1024 threads, a multiple of 32
    return int(min(1024, max(128, 32 * -(-packs // (4 * 32)))))


def smem_bytes(v: Variant, c: int) -> int:
    itemsize = np.dtype(v.dtype).itemsize
    if v.kind == "smem":
        return -(-c // v.vec) * v.vec * itemsize
    if v.kind == "cluster":
        return -(-c // (v.cluster * v.vec)) * v.vec * itemsize
    return 0


def grid_blocks(v: Variant, n: int, c: int, dev: Device) -> int:
    if v.kind == "regs":
        rows_per_block = REGS_THREADS // v.group
        return int(max(1, min(-(-n // rows_per_block), dev.sms * 32)))
    if v.kind == "cluster":
        return int(v.cluster * max(1, min(n, (dev.sms // v.cluster) * 2)))
    return int(max(1, min(n, dev.sms * 16)))


# ------------------------------------------------------------------------------------ runtime

@functools.lru_cache(maxsize=None)
def _function(expr: str):
    import cupy

    mod = cupy.RawModule(code=_kernel_source.expand(SOURCE), options=("--std=c++17",),
                         name_expressions=(expr,))
    return mod.get_function(expr)


@functools.lru_cache(maxsize=None)
def _device(dev_id: int) -> Device:
    import cupy

    p = cupy.cuda.runtime.getDeviceProperties(dev_id)
    return Device(10 * int(p["major"]) + int(p["minor"]), int(p["multiProcessorCount"]),
                  int(p["sharedMemPerBlockOptin"]))


def current_device() -> Device:
    import cupy

    return _device(cupy.cuda.Device().id)


def vec_for(dtype: str, c: int, *arrays_and_lds) -> int:
    """16-byte packs when every row of every array starts 16-byte aligned; else 1."""
    v = VEC_MAX[dtype]
    if c % v:
        return 1
    for arr, ld in arrays_and_lds:
        if arr.data.ptr % 16 or ld % v:
            return 1
    return v


def launch(x2, lbl, y2, w, a, scale, loss, lse, grad_out):
    """Run the chosen fused variant; returns the :class:`Variant` that ran.

    x2 (N, C) logits with unit column stride; lbl (N,) int32/int64 labels or None; y2 (N, C)
    probabilities of x2's dtype or None; w (C,) weights in the accumulation dtype; scale a
    0-d device scalar (the reduction's scale); loss, lse (N,) accumulation dtype outputs;
    grad_out (N, C) with unit column stride, or None for loss only.
    """
    n, c = x2.shape
    dtype = x2.dtype.name
    acc = np.dtype(ACC[dtype]).type
    label = "prob" if lbl is None else lbl.dtype.name
    isz = x2.dtype.itemsize
    ldx = x2.strides[0] // isz
    pairs = [(x2, ldx)]
    if grad_out is not None:
        ldg = grad_out.strides[0] // isz
        pairs.append((grad_out, ldg))
    else:
        ldg = 0
    vec = vec_for(dtype, c, *pairs)
    dev = current_device()
    v = choose(dtype, label, c, vec, dev)
    fn = _function(v.expr())
    shm = smem_bytes(v, c)
    if shm > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = shm
    import cupy

    dummy_lbl = lbl if lbl is not None else cupy.zeros(1, cupy.int32)
    dummy_y = y2 if y2 is not None else x2[:1]
    ldy = (y2.strides[0] // isz) if y2 is not None else 0
    null = np.uint64(0)
    args = (x2, np.int64(ldx), dummy_lbl, dummy_y, np.int64(ldy), w, np.int64(n), np.int32(c),
            acc(a.label_smoothing / c), acc(1.0 - a.label_smoothing), acc(a.z_loss),
            np.int64(a.ignore_index), scale, loss, lse,
            grad_out if grad_out is not None else null, np.int64(ldg))
    # no __launch_bounds__ in the source: stay within what the registers allow
    threads = min(block_threads(v, c), (fn.max_threads_per_block // 32) * 32)
    fn((grid_blocks(v, n, c, dev),), (threads,), args, shared_mem=shm)
    return v
