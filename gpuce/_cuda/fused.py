"""Fused softmax cross-entropy (``impl="fused"``): host side of kernels/gpuce_sce_fused.cu.

One launch reads each row of logits once, writes the gradient once and finishes the batch
sums on the device (see the kernel file's header); ``reduction="mean"`` with integer labels
adds one small prologue launch for the denominator.  The kernel kinds, by row length:

========  ===================================================================================
kind      layout
========  ===================================================================================
tile      C <= 32, dense rows: 128 rows a block, one thread a row, tiles copied whole into a
          3-stage ring of shared memory with cp.async (a candidate up to C = 128)
warp      G = 4..32 lanes a row (256 / G rows a block), 16-byte packs in each lane's own
          shared-memory ring, rows copied S - 1 ahead with cp.async
block     the block is the team (64..512 threads), same ring
cluster   sm_90: a cluster of CL = 2, 4, 8 blocks a row, partials exchanged through the
          peers' shared memory
twopass   a block a row, the row read twice: rows too long for the rings; sm_90 also has a
          cluster form (CL = 4, 8 blocks a row, only the partial state exchanged, no row in
          shared memory: CL times fewer bytes in flight between the two reads, so that the
          second one can hit L2), a candidate timed by ``gpuce bench --variants``
========  ===================================================================================

:func:`variants` is the one list of template instantiations: the runtime builds its RawModules
from it and the offline NVRTC test compiles all of it.  :func:`plan` is the launch heuristic
(a few lines of table, see :data:`WARP_PACKS` and friends); :func:`candidates` lists every
plan that can run a shape (tests and the benchmark run each); :func:`explain` says in words
what a call would run.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from dataclasses import dataclass

import numpy as np

from . import source

SOURCE = "gpuce_sce_fused.cu"

DTYPES = ("float16", "bfloat16", "float32", "float64")
CT = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double",
      "int32": "int", "int64": "long long"}
ACC = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int32": 4, "int64": 8}
VEC_MAX = {d: 16 // ITEMSIZE[d] for d in DTYPES}  # 16-byte packs
TARGETS = (("label", "int32"), ("label", "int64"), ("prob", "int32"))

TILE_ROWS = 128  # GPUCE_TILE_ROWS
TILE_MAX_C = 32  # GPUCE_TILE_MAX_C: the tile kernel is the choice up to here
TILE_WIDE_C = 128  # ... and a candidate (after the teams) up to here, for `gpuce bench --variants`
TILE_STAGES = 3  # GPUCE_TILE_STAGES
TEAM_MAX_THREADS = 512  # GPUCE_TEAM_THREADS
WARP_GROUPS = (4, 8, 16, 32)
WARP_THREADS = 256
WARP_PACKS = 4  # a warp team is chosen while each lane holds at most this many packs of a row
BLOCK_PACKS = 8  # a block team aims at this many packs a thread
CLUSTERS = (2, 4, 8)
TWOPASS_CLUSTERS = (4, 8)  # the cluster form of twopass: blocks a row
PART_BYTES = 32 * 1024  # a block's share of a row it aims at (cluster size from it)
STAGES = (3, 2)  # ring depths tried, deepest first
REG_PACKS = 16  # the register-stage cluster kernel: 16-byte packs a thread kept in registers
RING_BUDGET = 96 * 1024  # a ring deeper than 2 stages only within this much shared memory
STATIC_SMEM = 4096  # bound on the kernels' own __shared__ scratch (checked by the compile test)
WS_PARTIALS = 8  # GPUCE_WS_PARTIALS
WS_WORDS = 5  # GPUCE_NWORDS
MAX_BLOCKS_PER_SM = 32
MAX_CLASSES = 2**31 - 64  # a row's pack count (shift + C + VEC - 1) / VEC is an int in the kernels
DENOM_THREADS = 256


@dataclass(frozen=True)
class Variant:
    """One template instantiation: kernel kind, logits dtype, target kind, label index dtype
    (int32 for probability targets, where it is unused), pack width, lanes, cluster size."""

    kind: str  # tile | warp | block | cluster | twopass
    dtype: str
    target: str  # "label" | "prob"
    index: str  # "int32" | "int64"
    vec: int
    group: int = 0  # warp: lanes a row
    cluster: int = 0  # cluster: blocks a row
    regs: int = 0  # cluster: packs a thread held in registers (a register stage; 0: none)

    @property
    def min_arch(self) -> int:
        return 90 if self.cluster else 80

    def expr(self) -> str:
        t, i, a = CT[self.dtype], CT[self.index], CT[ACC[self.dtype]]
        mode = 1 if self.target == "prob" else 0  # the kernels' MODE_PROBS / MODE_LABELS
        head = f"{t}, {i}, {a}, {mode}, {self.vec}"
        if self.kind == "warp":
            return f"gpuce::sce_team<{head}, {self.group}>"
        if self.kind == "block":
            return f"gpuce::sce_team<{head}, 0>"
        if self.kind == "cluster" and self.regs:
            return f"gpuce::sce_cluster_regs<{head}, {self.cluster}, {self.regs}>"
        if self.kind == "cluster":
            return f"gpuce::sce_cluster<{head}, {self.cluster}>"
        if self.kind == "twopass" and self.cluster:
            return f"gpuce::sce_twopass_cluster<{head}, {self.cluster}>"
        return f"gpuce::sce_{self.kind}<{head}>"

    def describe(self) -> str:
        extra = f"-G{self.group}" if self.kind == "warp" else f"-CL{self.cluster}" if self.cluster else ""
        if self.regs:
            extra += f"-R{self.regs}"
        return f"{self.kind}{extra}-v{self.vec}"


def prologue_expr(index: str, acc: str) -> str:
    return f"gpuce::sce_prologue<{CT[index]}, {CT[acc]}>"


def variants():
    """Every instantiation gpuce may launch (the offline compile list)."""
    out = []
    for dtype in DTYPES:
        vm = VEC_MAX[dtype]
        for target, index in TARGETS:
            def v(kind, vec, **kw):
                return Variant(kind, dtype, target, index, vec, **kw)
            out += [v("tile", 1), v("tile", vm)]
            out += [v("warp", vm, group=g) for g in WARP_GROUPS]
            out += [v("block", 1), v("block", vm)]
            if ACC[dtype] == "float32":
                out += [v("cluster", vm, cluster=cl) for cl in CLUSTERS]
            if dtype == "float32" and target == "label":
                out.append(v("cluster", vm, cluster=CLUSTERS[-1], regs=REG_PACKS))
            out += [v("twopass", 1), v("twopass", vm)]
            if ACC[dtype] == "float32":
                out += [v("twopass", vm, cluster=cl) for cl in TWOPASS_CLUSTERS]
    return out


def prologue_exprs():
    return [prologue_expr(i, a) for i in ("int32", "int64") for a in ("float32", "float64")]


@dataclass(frozen=True)
class Device:
    """What the planner needs to know about the GPU."""

    arch: int  # e.g. 90
    sms: int
    smem_optin: int  # max dynamic shared memory a block, bytes
    smem_per_sm: int = 228 * 1024
    threads_per_sm: int = 2048


@dataclass(frozen=True)
class Plan:
    """A variant and its launch shape: threads a block, packs a thread (P), ring stages (S),
    dynamic shared memory, and rows a block handles at a time."""

    variant: Variant
    threads: int
    packs: int = 0
    stages: int = 0
    smem: int = 0
    rows_per_block: int = 1

    def describe(self) -> str:
        s = f"{self.variant.describe()} {self.threads}t"
        if self.variant.kind in ("warp", "block", "cluster"):
            s += f" P{self.packs} S{self.stages}"
        return s + f" {self.smem // 1024}KiB"


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _team_plan(v: Variant, c: int, threads: int, dev: Device, stages=STAGES):
    """The ring plan of a warp/block/cluster variant, or None when no ring fits."""
    pack = ITEMSIZE[v.dtype] * v.vec
    nt = v.group if v.kind == "warp" else threads * max(1, v.cluster)
    p = _ceil(_ceil(c, v.vec), nt)
    if v.regs:  # one shared-memory stage beside the register one, exactly v.regs packs a thread
        smem = v.regs * threads * pack
        ok = p <= v.regs and smem + STATIC_SMEM <= dev.smem_optin
        return Plan(v, threads, v.regs, 1, smem, 1) if ok else None
    per_stage = p * threads * pack * (2 if v.target == "prob" else 1)
    for s in stages:
        smem = s * per_stage
        if (s <= 2 or smem <= RING_BUDGET) and smem + STATIC_SMEM <= dev.smem_optin:
            rows = threads // v.group if v.kind == "warp" else 1
            return Plan(v, threads, p, s, smem, rows)
    return None


def tile_plan(v: Variant, c: int) -> Plan:
    """The tile kernel's launch shape for rows of ``c`` values: a ring of TILE_STAGES stages,
    each 128 rows of values as they lie in memory (a 16-byte multiple), then the targets'
    (MODE_PROBS) or the labels (as the kernel's tile_stage_bytes)."""
    values = _ceil(TILE_ROWS * c * ITEMSIZE[v.dtype], 16) * 16
    stage = values * (2 if v.target == "prob" else 1) + (TILE_ROWS * ITEMSIZE[v.index] if v.target == "label" else 0)
    return Plan(v, TILE_ROWS, stages=TILE_STAGES, smem=TILE_STAGES * stage, rows_per_block=TILE_ROWS)


def _block_threads(packs: int, per_thread: int) -> int:
    return int(min(TEAM_MAX_THREADS, max(64, 32 * _ceil(_ceil(packs, per_thread), 32))))


def candidates(dtype: str, target: str, index: str, c: int, vec: int, dev: Device,
               tile_vec: int | None = None, shifted: bool = False, softcap: bool = False) -> tuple:
    """Every plan that runs rows of ``c`` classes, the preferred first.

    ``vec`` is the pack width the rows allow (:func:`vec_for`); ``tile_vec`` the one the dense
    tile allows, or None when the rows are not dense (no tile); ``shifted``: rows may start
    off a 16-byte boundary (:func:`rows_shifted`), so a row may take one more pack;
    ``softcap``: the call caps the logits (the register-stage kernel has no softcap path: its
    tanh code spilled the 64 registers that hold the row).
    """
    return _candidates(dtype, target, index, c, vec, dev, tile_vec, bool(shifted and vec > 1), bool(softcap))


@functools.lru_cache(maxsize=4096)  # called on every launch; all arguments are hashable
def _candidates(dtype, target, index, c, vec, dev, tile_vec, shifted=False, softcap=False):
    def v(kind, vv, **kw):
        return Variant(kind, dtype, target, index, vv, **kw)

    out = []
    tile = None
    if tile_vec is not None and c <= TILE_WIDE_C:
        tile = tile_plan(v("tile", tile_vec), c)
        if tile.smem + STATIC_SMEM > dev.smem_optin:
            tile = None
    if tile and c <= TILE_MAX_C:
        out.append(tile)
    rows_c = c
    c = c + vec - 1 if shifted else c  # the columns a shifted row's granules span at most
    packs = _ceil(c, vec)
    if vec == VEC_MAX[dtype]:
        for g in WARP_GROUPS:
            if packs <= g * WARP_PACKS:
                p = _team_plan(v("warp", vec, group=g), c, WARP_THREADS, dev)
                if p:
                    out.append(p)
                # also half the lanes, twice the packs a lane (a candidate, not the choice: a
                # row's fixed work, done by every lane of its team, is then shared by fewer
                # lanes; `gpuce bench --variants` times both)
                half = _team_plan(v("warp", vec, group=g // 2), c, WARP_THREADS, dev) if g > WARP_GROUPS[0] else None
                if half:
                    out.append(half)
                break
    threads = _block_threads(packs, BLOCK_PACKS)
    part = _ceil(packs, threads) * threads * ITEMSIZE[dtype] * vec
    block = _team_plan(v("block", vec), c, threads, dev)
    if block and (part <= PART_BYTES or vec == 1 or ACC[dtype] != "float32" or dev.arch < 90):
        out.append(block)
    if vec == VEC_MAX[dtype] and ACC[dtype] == "float32" and dev.arch >= 90:
        found = False
        for cl in CLUSTERS:
            t = _block_threads(_ceil(packs, cl), BLOCK_PACKS)
            p = _team_plan(v("cluster", vec, cluster=cl), c, t, dev)
            if p and (p.packs * t * ITEMSIZE[dtype] * vec <= PART_BYTES or cl == CLUSTERS[-1]):
                out.append(p)
                found = True
                break
        if not found and dtype == "float32" and target == "label" and not shifted and not softcap:  # no two-stage ring fits
            cl = CLUSTERS[-1]
            t = _block_threads(_ceil(packs, cl), REG_PACKS)
            p = _team_plan(v("cluster", vec, cluster=cl, regs=REG_PACKS), c, t, dev)
            if p:
                out.append(p)
    if block and block not in out:
        out.append(block)
    if tile and rows_c > TILE_MAX_C:  # wider rows, a thread each: a candidate for the variants sweep
        out.append(tile)
    out.append(Plan(v("twopass", vec), _block_threads(packs, 4 * BLOCK_PACKS)))
    if vec == VEC_MAX[dtype] and ACC[dtype] == "float32" and dev.arch >= 90 and packs >= 4 * TEAM_MAX_THREADS:
        # candidates after the choice (not yet measured on a GPU): long rows split over a
        # cluster, BLOCK_PACKS packs a thread as the ring kernels
        for cl in TWOPASS_CLUSTERS:
            out.append(Plan(v("twopass", vec, cluster=cl), _block_threads(_ceil(packs, cl), BLOCK_PACKS)))
    return tuple(out)


def plan(dtype, target, index, c, vec, dev, tile_vec=None, shifted=False, softcap=False) -> Plan:
    """The preferred plan (the first of :func:`candidates`)."""
    return candidates(dtype, target, index, c, vec, dev, tile_vec, shifted, softcap)[0]


def occupancy_estimate(p: Plan, dev: Device) -> int:
    """Blocks an SM holds, from threads and shared memory alone (the runtime asks the driver)."""
    by_threads = dev.threads_per_sm // p.threads
    by_smem = dev.smem_per_sm // (p.smem + STATIC_SMEM + 1024)
    return int(max(1, min(by_threads, by_smem, MAX_BLOCKS_PER_SM)))


def grid_blocks(p: Plan, n: int, dev: Device, per_sm: int, clusters: int | None = None) -> int:
    """One wave: every block resident at once, each walking a fixed share of the rows (the
    grid depends only on the shape and the device, so the row-to-block mapping, and with it
    every sum, is the same run to run).  ``clusters``: for a cluster kernel, how many of its
    clusters the device holds at once (a cluster's blocks share one GPC, so SMs x blocks an
    SM / CL can be more than that; a grid past it would run its last clusters after the
    first ones finished all their rows)."""
    cl = max(1, p.variant.cluster)
    teams = _ceil(n, p.rows_per_block)
    wave = max(cl, (dev.sms * per_sm) // cl * cl)
    if clusters and cl > 1:
        wave = max(cl, min(wave, clusters * cl))
    return int(max(cl, min(teams * cl, wave)))


def explain_plan(p: Plan, c: int, n: int, dev: Device, per_sm: int, clusters: int | None = None) -> str:
    v = p.variant
    why = {
        "tile": f"dense rows of C = {c}: {TILE_ROWS} rows a block, one thread a row",
        "warp": f"{_ceil(c, v.vec)} packs of {v.vec} fit {v.group} lanes x {p.packs} packs",
        "block": f"a row of {c} takes a block of {p.threads} threads x {p.packs} packs",
        "cluster": f"a row of {c} is split over a cluster of {v.cluster} blocks of {p.threads} threads",
        "twopass": "no ring of shared memory holds the row: it is read twice",
    }[v.kind]
    if v.kind == "twopass" and v.cluster:
        why += f", by a cluster of {v.cluster} blocks of {p.threads} threads (partials exchanged)"
    g = grid_blocks(p, n, dev, per_sm, clusters)
    held = f"; {clusters} clusters held at once" if clusters else ""
    return (f"{v.expr()}: {why}; ring of {p.stages} stages, {p.smem} B of shared memory a block; "
            f"grid {g} blocks ({per_sm} an SM x {dev.sms} SMs{held})")


# ------------------------------------------------------------------------------------ runtime

def compile_options() -> tuple:
    """NVRTC options of the fused program.  ``GPUCE_XCHG_ORDERED=1`` in the environment (read
    when a kernel is first compiled) builds the cluster exchange with release/acquire stores
    and polls: a benchmark experiment (gpu_check.sh part variants), not a user setting; see
    kernels/gpuce_team.cuh."""
    ordered = os.environ.get("GPUCE_XCHG_ORDERED", "") == "1"
    return ("--std=c++17",) + (("-DGPUCE_XCHG_ORDERED",) if ordered else ())


@functools.lru_cache(maxsize=None)
def _module(exprs: tuple):
    import cupy

    return cupy.RawModule(code=source.expand(SOURCE), options=compile_options(),
                          name_expressions=exprs)


@functools.lru_cache(maxsize=None)
def function(expr: str):
    """The RawKernel of ``expr``, made once a process (CuPy's RawModule.get_function builds a
    new RawKernel and asks the driver for the function on every call; the RawKernel itself
    loads its module once per device)."""
    return _module((expr,)).get_function(expr)


@functools.lru_cache(maxsize=None)
def _device(dev_id: int) -> Device:
    import cupy

    p = cupy.cuda.runtime.getDeviceProperties(dev_id)
    return Device(10 * int(p["major"]) + int(p["minor"]), int(p["multiProcessorCount"]),
                  int(p["sharedMemPerBlockOptin"]), int(p["sharedMemPerMultiprocessor"]),
                  int(p["maxThreadsPerMultiProcessor"]))


def device_id() -> int:
    """The current device's ordinal (one runtime call, no Device object)."""
    import cupy

    return cupy.cuda.runtime.getDevice()


def current_device() -> Device:
    return _device(device_id())


def _prepare(fn, smem: int):
    """Raise the kernel's dynamic shared-memory limit (on the current device) when it needs
    more than the default."""
    if smem + STATIC_SMEM > 48 * 1024 and fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    return fn


@functools.lru_cache(maxsize=1024)
def _occupancy_on(dev_id: int, expr: str, threads: int, smem: int) -> int:
    from cupy_backends.cuda.api import driver

    fn = _prepare(function(expr), smem)
    try:
        per_sm = int(driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, smem))
    except Exception:
        per_sm = 0
    if per_sm < 1:
        p = Plan(Variant("block", "float32", "label", "int64", 4), threads, smem=smem)
        return occupancy_estimate(p, _device(dev_id))
    return min(MAX_BLOCKS_PER_SM, per_sm)


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig (cuda.h), with no attributes
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p), ("attrs", ctypes.c_void_p),
                ("numAttrs", ctypes.c_uint)]


@functools.lru_cache(maxsize=1024)
def _clusters_on(dev_id: int, expr: str, threads: int, smem: int, cl: int) -> int | None:
    """How many clusters of the cluster kernel ``expr`` (its cluster size fixed at compile
    time) the device holds at once: the driver's cuOccupancyMaxActiveClusters (CuPy has no
    binding), or None where it cannot answer (the SM-count estimate then stands)."""
    try:
        fn = _prepare(function(expr), smem)
        lib = ctypes.CDLL("libcuda.so.1")
        query = lib.cuOccupancyMaxActiveClusters
        query.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.POINTER(_LaunchConfig)]
        query.restype = ctypes.c_int
        cfg = _LaunchConfig(cl, 1, 1, threads, 1, 1, smem, None, None, 0)
        out = ctypes.c_int(0)
        if query(ctypes.byref(out), ctypes.c_void_p(fn.kernel.ptr), ctypes.byref(cfg)) != 0 or out.value < 1:
            return None
        return int(out.value)
    except Exception:  # noqa: BLE001  (no driver, an old driver, a kernel it cannot answer for)
        return None


def _occupancy(expr: str, threads: int, smem: int) -> int:
    """Blocks of ``expr`` an SM of the current device holds (the driver's occupancy API, after
    the shared-memory limit is raised; for a kernel it cannot answer for, the estimate from
    threads and shared memory)."""
    return _occupancy_on(device_id(), expr, threads, smem)


def residency(p: Plan) -> tuple:
    """``(blocks an SM, clusters held at once or None)`` of plan ``p`` on the current device:
    what :func:`grid_blocks` needs (the launch, explain and the probe ask here)."""
    expr, cl = p.variant.expr(), max(1, p.variant.cluster)
    per_sm = _occupancy(expr, p.threads, p.smem)
    return per_sm, (_clusters_on(device_id(), expr, p.threads, p.smem, cl) if cl > 1 else None)


def vec_for(dtype: str, c: int, *arrays_and_lds) -> int:
    """16-byte packs (VEC_MAX values) when every array's rows sit at the same offset within
    their 16-byte granules as the logits' rows (the same base misalignment, row strides equal
    modulo 16 bytes): each row is then read as the aligned granules that hold it, its edge
    packs masked in the kernels.  Else 1 (a value a pack).  The first pair is the logits'."""
    (x, ldx), rest = arrays_and_lds[0], arrays_and_lds[1:]
    isz = x.itemsize
    for arr, ld in rest:
        if (arr.data.ptr - x.data.ptr) % 16 or ((ld - ldx) * isz) % 16:
            return 1
    return VEC_MAX[dtype]


def rows_shifted(dtype: str, c: int, x, ldx: int) -> bool:
    """Whether some row of ``x`` may start off a 16-byte boundary or end inside a granule (then
    a row takes one more pack than C / VEC)."""
    return c % VEC_MAX[dtype] != 0 or x.data.ptr % 16 != 0 or (ldx * x.itemsize) % 16 != 0


def tile_vec_for(dtype: str, c: int, *arrays) -> int | None:
    """Pack width of the dense tile kernel: None unless the rows are dense (row stride C in
    every array); VEC_MAX when every base pointer is 16-byte aligned."""
    if c > TILE_WIDE_C or any(arr.strides[0] != c * arr.itemsize for arr in arrays):
        return None
    return VEC_MAX[dtype] if all(arr.data.ptr % 16 == 0 for arr in arrays) else 1


class _ThreadWorkspaces(threading.local):
    """This host thread's launch workspaces, by (device, stream handle)."""

    def __init__(self):
        self.by_stream = {}


_WORKSPACES = _ThreadWorkspaces()


def workspace(cp):
    """The launch workspace of the current device and stream for this host thread (zeroed once;
    every launch leaves it as it found it).

    It is a thread's own, not a stream's: under CuPy's per-thread default stream
    (``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``) every thread's stream has the one handle 2, and
    two threads that share a stream object can interleave their launches (one call's prologue,
    another's, then the first call's fused kernel reading the denominator in the workspace).
    Calls a thread makes on one stream run in order, so they share it; a thread's workspaces go
    with the thread.

    A CUDA graph that captured gpuce calls holds the capturing thread's workspace: replay it on
    the stream it was captured on (or one ordered with it), never two replays at once, and never
    beside uncaptured gpuce calls of that thread on that stream that could run concurrently with
    the replay (their tickets and partial slots would mix)."""
    stream = cp.cuda.get_current_stream()
    key = (device_id(), stream.ptr)
    mine = _WORKSPACES.by_stream
    ws = mine.get(key)
    if ws is None:  # the stream object is kept alive with its workspace
        if stream.is_capturing():
            raise RuntimeError("gpuce's first fused call on a stream cannot be inside a CUDA graph "
                               "capture (its workspace is zeroed then): make one call on the "
                               "stream, from the same host thread, before capturing")
        ws = mine[key] = (cp.zeros(WS_PARTIALS + WS_WORDS * current_device().sms * MAX_BLOCKS_PER_SM,
                                   cp.int64), stream)
    return ws[0]


def candidates_for(x2, target_kind, index, y2=None, grad_out=None, softcap=False) -> tuple:
    """``(candidates, vec, device)`` for these arrays: logits ``x2`` (unit column stride), the
    probability targets and the gradient output (None where absent); ``softcap``: whether the
    call caps the logits."""
    n, c = x2.shape
    dtype = x2.dtype.name
    isz = x2.itemsize
    arrays = [x2] + [a for a in (y2, grad_out) if a is not None]
    vec = vec_for(dtype, c, *[(a, a.strides[0] // isz) for a in arrays])
    tv = tile_vec_for(dtype, c, *arrays)
    dev = current_device()
    shifted = rows_shifted(dtype, c, x2, x2.strides[0] // isz)
    return candidates(dtype, target_kind, index, c, vec, dev, tv, shifted, softcap), vec, dev


def choose(x2, target_kind, index, y2, grad_out, pinned=None, softcap=False) -> tuple:
    """``(plan, vec, device)`` for logits ``x2`` (unit column stride), the targets and the
    gradient output; ``pinned`` (a :class:`Plan` or :class:`Variant`) replaces the heuristic's
    pick after a check that it can run this shape."""
    cands, vec, dev = candidates_for(x2, target_kind, index, y2, grad_out, softcap)
    if pinned is None:
        return cands[0], vec, dev
    want = pinned.variant if isinstance(pinned, Plan) else pinned
    for p in cands:
        if p.variant == want:
            return p, vec, dev
    raise ValueError(f"pinned variant {want.describe()} ({want.dtype}, {want.target}, {want.index}) cannot "
                     f"run {x2.dtype.name} rows of {x2.shape[1]} classes here; candidates: "
                     f"{', '.join(p.variant.describe() for p in cands)}")


def by_value(v):
    """A NumPy scalar kernel argument prepared once for many launches: CuPy passes a
    ``CNumpyArray`` (its holder of a by-value argument) through as it is, where a NumPy
    scalar is converted on every launch.  The scalar itself where CuPy has no such class."""
    try:
        from cupy.cuda.function import CNumpyArray
    except ImportError:  # pragma: no cover - another CuPy layout: convert per launch
        return v
    return CNumpyArray(np.asarray(v).reshape(1))


_RECIPES = {}
RECIPES_MAX = 1024  # signatures remembered (the table is emptied when full)


@dataclass(frozen=True)
class Recipe:
    """What the launches of one call signature need, worked out on its first call: the plan,
    the fused kernel and its grid, the prologue (or None) and its grid, and every scalar
    argument.  A call with the same signature (device, shapes, strides, dtypes, base pointers
    modulo 16 bytes, which arrays are given, options) only fills in the arrays."""

    plan: Plan
    fn: object
    grid: int
    prologue: object
    prologue_grid: int
    prologue_scalars: tuple
    scalars: tuple


def _layout(a):
    return None if a is None else (a.strides, a.data.ptr & 15)


def recipe(x2, lbl, y2, w, *, acc, eps, z, softcap, ignore_index, reduction, grad_out, pinned=None,
           grid=None, denominator=None) -> Recipe:
    """The :class:`Recipe` of a call (remembered by signature; see :func:`launch`)."""
    key = (device_id(), x2.shape, x2.strides, x2.data.ptr & 15, x2.dtype, None if lbl is None else lbl.dtype,
           _layout(y2), _layout(grad_out), w is None, acc, eps, z, softcap, ignore_index, reduction, pinned, grid,
           denominator is None)  # a given denominator's value is passed at launch (mean_inv)
    r = _RECIPES.get(key)
    if r is None:
        r = _make_recipe(x2, lbl, y2, w, acc=acc, eps=eps, z=z, softcap=softcap, ignore_index=ignore_index,
                         reduction=reduction, grad_out=grad_out, pinned=pinned, grid=grid,
                         denominator=denominator)
        if len(_RECIPES) >= RECIPES_MAX:
            _RECIPES.clear()
        _RECIPES[key] = r
    return r


def _make_recipe(x2, lbl, y2, w, *, acc, eps, z, softcap, ignore_index, reduction, grad_out, pinned, grid,
                 denominator=None):
    n, c = x2.shape
    if c > MAX_CLASSES:
        raise ValueError(f"the fused kernels take at most {MAX_CLASSES} classes, got {c}")
    target = "prob" if lbl is None else "label"
    index = "int32" if lbl is None else lbl.dtype.name
    p, _, dev = choose(x2, target, index, y2, grad_out, pinned, softcap=bool(softcap))
    inv_from_ws = 0
    inv = 1.0
    given = denominator  # the whole call's denominator (a block of it), or None
    denominator = reduction == "mean" and lbl is not None and given is None
    if reduction == "mean" and given is not None:
        inv = mean_inv(given)  # this call's; a later call of the signature passes its own
    elif reduction == "mean" and lbl is None:
        inv = 1.0 / n
    prologue, blocks, pro_scalars = None, 0, ()
    if denominator or w is not None:  # the prologue: the weights' check and / or the denominator
        inv_from_ws = int(denominator)
        blocks = int(max(1, min(_ceil(n, DENOM_THREADS), dev.sms * 4))) if denominator else 1
        prologue = function(prologue_expr(index, np.dtype(acc).name))
        pro_scalars = tuple(map(by_value, prologue_args(None, None, n, c, ignore_index, denominator, None)[2:-1]))
    expr = p.variant.expr()
    fn = _prepare(function(expr), p.smem)
    cl = max(1, p.variant.cluster)
    if grid is None:
        grid = grid_blocks(p, n, dev, *residency(p))
    elif grid % cl or not 0 < grid <= dev.sms * MAX_BLOCKS_PER_SM:  # the workspace holds that many
        raise ValueError(f"grid {grid} must be a multiple of {cl} in [1, {dev.sms * MAX_BLOCKS_PER_SM}]")
    scalars = kernel_scalars(p, x2, y2, grad_out, acc=acc, eps=eps, z=z, softcap=softcap,
                             ignore_index=ignore_index, inv=inv, inv_from_ws=inv_from_ws)
    return Recipe(p, fn, int(grid), prologue, blocks, pro_scalars, tuple(map(by_value, scalars)))


def mean_inv(denominator) -> float:
    """1 / denominator, 0 for a zero denominator (the zero-denominator rule)."""
    return 0.0 if denominator == 0 else 1.0 / denominator


INV_SCALAR = 9  # the position of inv among kernel_scalars' values


def launch(x2, lbl, y2, w, *, acc, eps, z, softcap, ignore_index, reduction, loss_out, lse_out,
           correct_out, grad_out, total_out, stats_out, bad_out, pinned=None, grid=None, ws=None,
           denominator=None) -> Plan:
    """Run the fused path: the prologue where the call needs one (class weights to check, or the
    denominator of reduction "mean" with labels), then the fused kernel.  Nothing else is
    launched and nothing waits for the device.

    x2 (N, C) logits with unit column stride; lbl (N,) int32/int64 labels or None; y2 (N, C)
    probabilities of x2's dtype or None; w (C,) weights in ``acc`` or None (all ones); the
    outputs are device arrays or None: loss_out, lse_out, correct_out (N,) in ``acc``;
    grad_out (N, C) with unit column stride; total_out 0-d; stats_out (2,) [z part,
    accuracy]; bad_out (2,) int64 (the first bad label position, N when none; the first class
    weight that is NaN or infinite, -1 when none: the results are then NaN).  ``grid``
    overrides the one-wave grid (the probe's sweep; a multiple of the cluster size); ``ws`` is
    the stream's :func:`workspace` where the caller has it already.  ``denominator``: the
    "mean" reduction's denominator when the rows are one block of a larger call (no prologue
    computes it then), or None.

    The plan, the kernels, the grids and the scalar arguments come from the call's
    :func:`recipe`, worked out once per signature: a repeated call only looks it up and
    passes its arrays.
    """
    import cupy

    r = recipe(x2, lbl, y2, w, acc=acc, eps=eps, z=z, softcap=softcap, ignore_index=ignore_index,
               reduction=reduction, grad_out=grad_out, pinned=pinned, grid=grid, denominator=denominator)
    if ws is None:
        ws = workspace(cupy)
    if r.prologue is not None:
        r.prologue((r.prologue_grid,), (DENOM_THREADS,),
                   (lbl, w) + r.prologue_scalars + (ws,))
    p = r.plan
    scalars = r.scalars
    if reduction == "mean" and denominator is not None:  # the recipe is shared by every value
        scalars = (scalars[:INV_SCALAR] + (by_value(np.float64(mean_inv(denominator))),)
                   + scalars[INV_SCALAR + 1:])
    r.fn((r.grid,), (p.threads,),
         kernel_args(p, x2, lbl, y2, w, loss_out=loss_out, lse_out=lse_out, correct_out=correct_out,
                     grad_out=grad_out, ws=ws, total_out=total_out, stats_out=stats_out, bad_out=bad_out,
                     scalars=scalars),
         shared_mem=p.smem)
    return p


def prologue_args(lbl, w, n, c, ignore_index, denominator, ws) -> tuple:
    """sce_prologue's argument tuple (labels or None, weights or None, n, C, ignore_index,
    whether to compute the denominator, ws)."""
    return (lbl, w, np.int64(n), np.int32(c),
            np.int64(ignore_index), np.int32(bool(denominator)), ws)


def kernel_scalars(p: Plan, x2, y2, grad_out, *, acc, eps, z, softcap, ignore_index, inv, inv_from_ws) -> tuple:
    """The fused kernel's scalar arguments, in :func:`kernel_args`' order, as NumPy scalars of
    each parameter's width: ldx, ldy, n, C, eps / C, 1 - eps, z, softcap, ignore_index, inv,
    inv_from_ws, ldg (+ P, S for the ring kernels)."""
    at = np.dtype(acc).type
    isz = x2.itemsize
    n, c = x2.shape
    out = (np.int64(x2.strides[0] // isz), np.int64(y2.strides[0] // isz if y2 is not None else 0), np.int64(n),
           np.int32(c), at(eps / c), at(1.0 - eps), at(z), at(softcap or 0.0), np.int64(ignore_index),
           np.float64(inv), np.int32(inv_from_ws),
           np.int64(grad_out.strides[0] // isz if grad_out is not None else 0))
    if p.variant.kind in ("warp", "block", "cluster"):
        out += (np.int32(p.packs), np.int32(p.stages))
    return out


def kernel_args(p: Plan, x2, lbl, y2, w, *, loss_out, lse_out, correct_out, grad_out, ws, total_out, stats_out,
                bad_out, scalars=None, **options) -> tuple:
    """The fused kernel's argument tuple, in the order and widths of GPUCE_SCE_PARAMS (+ P, S
    for the ring kernels): arrays as themselves, absent ones as None (CuPy passes a null
    pointer), integers and floats as NumPy scalars of the parameter's width (tests check it
    against the source).
    ``scalars`` is :func:`kernel_scalars`' tuple, or None to work it out from ``options``
    (acc, eps, z, softcap, ignore_index, inv, inv_from_ws)."""
    if scalars is None:
        scalars = kernel_scalars(p, x2, y2, grad_out, **options)
    ldx, ldy, n, c, eps_c, one_eps, z, cap, ii, inv, inv_ws, ldg, *ring = scalars
    return (x2, ldx, lbl, y2, ldy, w, n, c, eps_c, one_eps, z, cap, ii, inv, inv_ws, loss_out, lse_out,
            correct_out, grad_out, ldg, ws, total_out, stats_out, bad_out, *ring)


def explain(x2, target_kind="label", index="int64", y2=None, grad_out=None, softcap=False) -> str:
    """Which kernel a call on these arrays would run, and why (CuPy arrays, a visible GPU)."""
    p, _, dev = choose(x2, target_kind, index, y2, grad_out, softcap=softcap)
    return explain_plan(p, x2.shape[1], x2.shape[0], dev, *residency(p))

