"""Fused softmax cross-entropy (``impl="fused"``): host side of kernels/gpuce_sce_fused.cu.

One launch reads each row of logits once and writes loss, lse and the gradient once; the
row stays on chip in between:

``tile``     C <= 32, dense rows: 128 rows a block staged through shared memory with
             coalesced loads and stores, one thread per row;
``warp``     G lanes of a warp per row (several rows a warp for small C), in registers;
``block``    a block per row: ITEMS packs a thread in registers (+ SITEMS 16-byte packs
             copied into shared memory with cp.async);
``cluster``  sm_90: a thread-block cluster of CL blocks per row, partials exchanged through
             distributed shared memory;
``twopass``  one block per row reading the row twice (online max / sum-exp, then the
             gradient) -- only where none of the single-read variants fits.

:func:`variants` is the one list of template instantiations: the runtime builds its
RawModules from it and the offline NVRTC test compiles all of it.  :func:`candidates` lists
every variant that can run a shape, in order of preference; :func:`choose` takes the first
(tests and the benchmark can pin another with :data:`PIN`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from . import _kernel_source

SOURCE = "gpuce_sce_fused.cu"

CT = {"float16": "__half", "float32": "float", "float64": "double", "int32": "int", "int64": "long long"}
ACC = {"float16": "float32", "float32": "float32", "float64": "float64"}
VEC_MAX = {"float16": 8, "float32": 4, "float64": 2}  # 16-byte packs
REG_ELEMS = {"float16": 32, "float32": 32, "float64": 4}  # row values a thread keeps in registers
REG_SCALARS = {"float16": 16, "float32": 16, "float64": 4}  # ... loaded one by one (VEC = 1)
WARP_GROUPS = (4, 8, 16, 32)  # lanes a row in the warp kernel
CLUSTERS = (2, 4, 8)
TILE_ROWS = 128
TILE_MAX_C = 32
MAX_TEAM_THREADS = 256  # __launch_bounds__(256, 3 or 2) on the warp, block and cluster kernels
WARP_THREADS = 256
SMEM_ITEMS = (1, 3)  # shared-memory packs a thread, in multiples of the register packs

STATIC_SMEM = 1024  # bound on the kernels' own __shared__ scratch (reductions, cluster partials)
PIN = None  # a Variant to run instead of the chooser's pick (tests, benchmark); None: choose


@dataclass(frozen=True)
class Variant:
    kind: str  # tile | warp | block | cluster | twopass
    dtype: str  # logits dtype
    label: str  # "int32" | "int64" | "prob"
    vec: int
    items: int = 0  # warp, block, cluster: packs a thread in registers
    group: int = 0  # warp: lanes per row
    cluster: int = 0  # cluster: blocks per row
    sitems: int = 0  # block, cluster: packs a thread in shared memory
    ahead: bool = False  # warp, block, cluster with labels: each row's label loaded a row ahead

    @property
    def min_arch(self) -> int:
        return 90 if self.kind == "cluster" else 80

    def expr(self) -> str:
        t, a = CT[self.dtype], CT[ACC[self.dtype]]
        i = CT["int32"] if self.label == "prob" else CT[self.label]
        mode = 1 if self.label == "prob" else 0
        head = f"gpuce::sce_{self.kind}<{t}, {i}, {a}, {mode}, {self.vec}"
        tail = ", true>" if self.ahead else ">"
        if self.kind == "warp":
            return f"{head}, {self.items}, {self.group}{tail}"
        if self.kind == "block":
            return f"{head}, {self.items}, {self.sitems}{tail}"
        if self.kind == "cluster":
            return f"{head}, {self.items}, {self.sitems}, {self.cluster}{tail}"
        return f"{head}>"

    def per_thread(self) -> int:
        """Row values one thread holds (registers + shared memory)."""
        return (self.items + self.sitems) * self.vec

    def describe(self) -> str:
        extra = {"warp": f"G{self.group}xI{self.items}", "block": f"I{self.items}+S{self.sitems}",
                 "cluster": f"CL{self.cluster}xI{self.items}+S{self.sitems}"}.get(self.kind, "")
        return f"{self.kind}{'-' + extra if extra else ''}-v{self.vec}{'-ahead' if self.ahead else ''}"


def max_items(dtype: str, vec: int) -> int:
    """Packs a thread keeps in registers (fewer when loaded one by one; probability-target
    kernels hold as many, under a looser register cap)."""
    return min(REG_ELEMS[dtype], REG_SCALARS[dtype]) if vec == 1 else REG_ELEMS[dtype] // vec


def warp_shapes(dtype: str, vec: int):
    """(G, ITEMS) shapes of the warp kernel: G in 4..32 lanes a row, ITEMS in 1..max packs a
    lane, ordered by capacity G * ITEMS * vec and then by G -- so the first that holds a row
    is the tightest, with the fewest lanes: more rows a warp and more loads in flight a lane,
    and shorter shuffle trees."""
    shapes = []
    for g in WARP_GROUPS:
        it = 1
        while it <= max_items(dtype, vec):
            shapes.append((g, it))
            it *= 2
    return sorted(shapes, key=lambda s: (s[0] * s[1], s[0]))


def variants():
    """Every instantiation gpuce may launch."""
    out = []
    for dtype in ("float16", "float32", "float64"):
        for label in ("int32", "int64", "prob"):
            for vec in sorted({1, VEC_MAX[dtype]}):
                im = max_items(dtype, vec)
                out.append(Variant("tile", dtype, label, vec))
                for g, items in warp_shapes(dtype, vec):
                    out.append(Variant("warp", dtype, label, vec, items, g))
                out.append(Variant("block", dtype, label, vec, im))
                if vec == VEC_MAX[dtype]:
                    for k in SMEM_ITEMS:
                        out.append(Variant("block", dtype, label, vec, im, sitems=k * im))
                    for cl in CLUSTERS:
                        for s in (0,) + tuple(k * im for k in SMEM_ITEMS):
                            out.append(Variant("cluster", dtype, label, vec, im, cluster=cl, sitems=s))
                out.append(Variant("twopass", dtype, label, vec))
    # labels loaded one row ahead: the label-target forms of the 16-byte-pack kernels
    out += [replace(v, ahead=True) for v in out if v.label != "prob" and v.vec == VEC_MAX[v.dtype]
            and v.kind in ("warp", "block", "cluster")]
    return out


@dataclass(frozen=True)
class Device:
    """What the chooser needs to know about the GPU."""

    arch: int  # e.g. 90
    sms: int
    smem_optin: int  # max dynamic shared memory per block, bytes


def _ceil32(k: int) -> int:
    return 32 * -(-k // 32)


def block_threads(v: Variant, c: int) -> int:
    if v.kind == "warp":
        return WARP_THREADS
    if v.kind == "tile":
        return TILE_ROWS
    if v.kind in ("block", "cluster"):
        return max(64, _ceil32(-(-c // (max(1, v.cluster) * v.per_thread()))))
    packs = -(-c // v.vec)  # twopass: about 4 packs a thread, 128..1024 threads
    return int(min(1024, max(128, 32 * -(-packs // (4 * 32)))))


def smem_bytes(v: Variant, c: int) -> int:
    acc = np.dtype(ACC[v.dtype]).itemsize
    if v.kind == "tile":
        e = TILE_ROWS * c
        return (e + (e >> 5) + 1) * acc
    if v.kind in ("block", "cluster"):
        return block_threads(v, c) * v.sitems * 16  # raw 16-byte packs
    return 0


def fits(v: Variant, c: int, dev: Device) -> bool:
    """Whether variant ``v`` can run rows of ``c`` classes on ``dev``."""
    if v.min_arch > dev.arch:
        return False
    if v.kind == "tile":
        return c <= TILE_MAX_C and smem_bytes(v, c) <= 48 * 1024
    if v.kind == "warp":
        return v.group * v.items * v.vec >= c
    if v.kind in ("block", "cluster"):
        return block_threads(v, c) <= MAX_TEAM_THREADS and smem_bytes(v, c) <= dev.smem_optin - STATIC_SMEM
    return True  # twopass


@functools.lru_cache(maxsize=4096)  # called on every launch; all arguments are hashable
def candidates(dtype: str, label: str, c: int, vec: int, dev: Device, tile_vec: int | None = None):
    """Every variant kind that runs a row of ``c`` classes, most preferred first.

    ``vec`` is the pack width the rows allow (see :func:`vec_for`); ``tile_vec`` the one the
    dense tile allows, or None when the rows are not dense (no tile).  Of each kind (tile,
    warp, block, cluster, block and cluster with shared-memory items) the smallest shape that
    holds the row; preference: tile, warp, block, cluster, the shared-memory forms, then (label
    targets) the same shapes with labels loaded a row ahead -- not yet measured on a GPU, so
    last -- and twopass.
    """
    im = max_items(dtype, vec)
    out = [Variant("tile", dtype, label, tile_vec)] if tile_vec is not None else []
    out += [Variant("warp", dtype, label, vec, it, g) for g, it in warp_shapes(dtype, vec)]
    out.append(Variant("block", dtype, label, vec, im))
    if vec == VEC_MAX[dtype]:
        out += [Variant("cluster", dtype, label, vec, im, cluster=cl) for cl in CLUSTERS]
        out += [Variant("block", dtype, label, vec, im, sitems=k * im) for k in SMEM_ITEMS]
        out += [Variant("cluster", dtype, label, vec, im, cluster=cl, sitems=k * im)
                for k in SMEM_ITEMS for cl in CLUSTERS]
    seen, picked = set(), []
    for v in out:
        key = (v.kind, v.sitems > 0)
        if key not in seen and fits(v, c, dev):
            seen.add(key)
            picked.append(v)
    if label != "prob" and vec == VEC_MAX[dtype]:  # the same shapes with the label a row ahead
        picked += [replace(v, ahead=True) for v in picked if v.kind in ("warp", "block", "cluster")]
    picked.append(Variant("twopass", dtype, label, vec))
    return tuple(picked)


def choose(dtype: str, label: str, c: int, vec: int, dev: Device, tile_vec: int | None = None) -> Variant:
    """The preferred variant for a row of ``c`` classes (see :func:`candidates`)."""
    return candidates(dtype, label, c, vec, dev, tile_vec)[0]


def grid_blocks(v: Variant, n: int, c: int, dev: Device) -> int:
    if v.kind == "warp":
        return int(max(1, min(-(-n // (WARP_THREADS // v.group)), dev.sms * 16)))
    if v.kind == "tile":
        return int(max(1, min(-(-n // TILE_ROWS), dev.sms * 16)))
    if v.kind == "cluster":
        return int(v.cluster * max(1, min(n, dev.sms * 8 // v.cluster)))
    return int(max(1, min(n, dev.sms * 8)))


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


def tile_vec_for(dtype: str, c: int, x2, grad_out) -> int | None:
    """Pack width of the dense tile kernel: None unless the rows are dense (row stride C in
    the logits and the gradient); VEC_MAX when both base pointers are 16-byte aligned."""
    isz = x2.dtype.itemsize
    arrs = [x2] + ([grad_out] if grad_out is not None else [])
    if c > TILE_MAX_C or any(arr.strides[0] != c * isz for arr in arrs):
        return None
    return VEC_MAX[dtype] if all(arr.data.ptr % 16 == 0 for arr in arrs) else 1


def launch(x2, lbl, y2, w, a, scale, loss, lse, grad_out):
    """Run the chosen fused variant (or :data:`PIN`); returns the :class:`Variant` that ran.

    x2 (N, C) logits with unit column stride; lbl (N,) int32/int64 labels or None; y2 (N, C)
    probabilities of x2's dtype or None; w (C,) weights in the accumulation dtype, or None
    for all ones; scale a 0-d device scalar (the reduction's scale); loss, lse (N,)
    accumulation dtype outputs; grad_out (N, C) with unit column stride, or None for loss only.
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
    tv = tile_vec_for(dtype, c, x2, grad_out)
    if PIN is None:
        v = choose(dtype, label, c, vec, dev, tv)
    else:
        v = PIN
        ok = (v.dtype, v.label) == (dtype, label) and fits(v, c, dev) and (
            v.vec in (1, vec) if v.kind != "tile" else tv is not None and v.vec in (1, tv))
        if not ok:
            raise ValueError(f"pinned variant {v.describe()} ({v.dtype}, {v.label}) cannot run "
                             f"{dtype} rows of {c} classes with {label} targets here")
    fn = _function(v.expr())
    shm = smem_bytes(v, c)
    if shm + STATIC_SMEM > 48 * 1024:  # dynamic + static shared memory past the default 48 KiB
        fn.max_dynamic_shared_size_bytes = shm
    import cupy

    dummy_lbl = lbl if lbl is not None else cupy.zeros(1, cupy.int32)
    dummy_y = y2 if y2 is not None else x2[:1]
    ldy = (y2.strides[0] // isz) if y2 is not None else 0
    null = np.uint64(0)
    args = (x2, np.int64(ldx), dummy_lbl, dummy_y, np.int64(ldy), w if w is not None else null,
            np.int64(n), np.int32(c), acc(a.label_smoothing / c), acc(1.0 - a.label_smoothing),
            acc(a.z_loss), np.int64(a.ignore_index), scale, loss, lse,
            grad_out if grad_out is not None else null, np.int64(ldg))
    threads = block_threads(v, c)
    if threads > fn.max_threads_per_block:  # only the two-pass kernel has no __launch_bounds__
        threads = (fn.max_threads_per_block // 32) * 32
        if v.kind != "twopass":
            raise RuntimeError(f"{v.describe()}: {block_threads(v, c)} threads a block exceed "
                               f"the kernel's limit of {fn.max_threads_per_block}")
    fn((grid_blocks(v, n, c, dev),), (threads,), args, shared_mem=shm)
    return v
