"""The fused kernels' launch planner (no GPU needed): the variant list, the plans it picks
for each row length, and the grid."""

import numpy as np
import pytest

from gpuce._cuda import fused as F

H100 = F.Device(arch=90, sms=132, smem_optin=227 * 1024)
A100 = F.Device(arch=80, sms=108, smem_optin=163 * 1024, smem_per_sm=164 * 1024)


def _covers(p, c):
    """Columns a plan's team holds in its ring."""
    v = p.variant
    if v.kind in ("tile", "twopass"):
        return c
    nt = v.group if v.kind == "warp" else p.threads * max(1, v.cluster)
    return p.packs * nt * v.vec


@pytest.mark.parametrize("dtype,c,vec,tile_vec,kind,detail", [
    ("float32", 10, 1, 4, "tile", None),  # dense tiny rows: the tile
    ("float32", 12, 4, None, "warp", 4),  # not dense: 4 lanes a row, 64 rows a block
    ("float32", 100, 4, None, "warp", 8),
    ("float32", 500, 4, None, "warp", 32),
    ("float32", 1000, 4, None, "block", None),
    ("float32", 1001, 1, None, "block", None),  # unaligned rows: one value a pack
    ("float32", 4096, 4, None, "block", None),
    ("float32", 8192, 4, None, "block", None),  # 32 KiB a row: one block
    ("float32", 32768, 4, None, "cluster", 4),  # 128 KiB: 4 x 32 KiB
    ("bfloat16", 32768, 8, None, "cluster", 2),
    ("float32", 131072, 4, None, "cluster", 8),
    ("float16", 262144, 8, None, "cluster", 8),
    ("float32", 262144, 4, None, "cluster", 8),  # 1 MiB a row: the register-stage cluster kernel
    ("float32", 524288, 4, None, "twopass", None),  # 2 MiB: nothing holds it
    ("float64", 262144, 2, None, "twopass", None),
])
def test_plan_on_h100(dtype, c, vec, tile_vec, kind, detail):
    p = F.plan(dtype, "label", "int64", c, vec, H100, tile_vec)
    assert p.variant.kind == kind
    if kind == "warp":
        assert p.variant.group == detail and p.packs <= F.WARP_PACKS
    if kind == "cluster":
        assert p.variant.cluster == detail
    if kind in ("warp", "block", "cluster"):
        # the next row is in flight while this one is computed (in a ring stage, or in the one
        # shared-memory stage beside a register stage)
        assert p.stages >= 2 or (p.variant.regs and p.stages == 1)
        assert p.smem + F.STATIC_SMEM <= H100.smem_optin
        assert p.threads % 32 == 0 and p.threads <= F.TEAM_MAX_THREADS
    assert _covers(p, c) >= c
    assert p.variant in F.variants()  # every choice is compiled by the NVRTC test


@pytest.mark.parametrize("c", [3, 10, 32, 100, 1000, 4096, 32768, 131072, 262144])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("target", ["label", "prob"])
def test_every_candidate_fits_and_is_compiled(dtype, c, target):
    vec = F.VEC_MAX[dtype] if c % F.VEC_MAX[dtype] == 0 else 1
    index = "int32" if target == "prob" else "int64"
    cands = F.candidates(dtype, target, index, c, vec, H100, F.VEC_MAX[dtype] if c <= F.TILE_WIDE_C else None)
    assert cands[-1].variant.kind == "twopass"
    assert len({p.variant for p in cands}) == len(cands)
    for p in cands:
        assert _covers(p, c) >= c
        assert p.smem + F.STATIC_SMEM <= H100.smem_optin
        assert p.variant in F.variants()


def test_register_stage_only_where_no_ring_fits():
    p = F.plan("float32", "label", "int64", 262144, 4, H100)
    assert p.variant.regs == F.REG_PACKS and p.packs == F.REG_PACKS and p.stages == 1
    assert p.smem == F.REG_PACKS * p.threads * 16
    for c in (1000, 32768, 131072):
        assert not F.plan("float32", "label", "int64", c, 4, H100).variant.regs
    assert not any(p.variant.regs for p in F.candidates("float32", "prob", "int32", 262144, 4, H100))
    # the register-stage kernel has no softcap path: a softcap call gets another kernel
    capped = F.candidates("float32", "label", "int64", 262144, 4, H100, softcap=True)
    assert capped and not any(p.variant.regs for p in capped)
    assert capped[-1].variant.kind == "twopass"


def test_no_cluster_before_sm90():
    assert F.plan("float32", "label", "int64", 262144, 4, A100).variant.kind == "twopass"
    assert all(p.variant.kind != "cluster" for p in F.candidates("float32", "label", "int64", 32768, 4, A100))
    assert F.plan("float32", "label", "int64", 32768, 4, A100).variant.kind == "twopass"  # 2 x 128 KiB
    assert F.plan("float32", "label", "int64", 16384, 4, A100).variant.kind == "block"  # 2 x 64 KiB


def test_grid_is_one_wave_and_a_cluster_multiple():
    p = F.plan("float32", "label", "int64", 131072, 4, H100)
    per_sm = F.occupancy_estimate(p, H100)
    g = F.grid_blocks(p, 10**6, H100, per_sm)
    assert g % p.variant.cluster == 0 and g <= H100.sms * per_sm
    assert F.grid_blocks(p, 3, H100, per_sm) == 3 * p.variant.cluster  # no more teams than rows
    p = F.plan("float32", "label", "int64", 12, 4, H100)
    assert p.variant.kind == "warp" and p.rows_per_block == 64
    assert F.grid_blocks(p, 6400, H100, 8) == 100  # 64 rows a block
    assert F.grid_blocks(p, 10**8, H100, 8) == 132 * 8  # one wave, each block walks its rows


def test_variant_names_are_unique_and_every_dtype_is_compiled():
    exprs = [v.expr() for v in F.variants()]
    assert len(exprs) == len(set(exprs))
    assert all(e.startswith("gpuce::sce_") for e in exprs)
    assert {v.dtype for v in F.variants()} == set(F.DTYPES)
    assert any("__nv_bfloat16" in e for e in exprs)
    assert not any(v.kind == "cluster" and v.dtype == "float64" for v in F.variants())


def test_explain_names_the_kernel_and_why():
    p = F.plan("float32", "label", "int64", 32768, 4, H100)
    s = F.explain_plan(p, 32768, 4096, H100, 1)
    assert "sce_cluster" in s and "cluster of 4" in s and "grid" in s


class _Arr:
    """What vec_for / rows_shifted read of a device array: its pointer and item size."""

    def __init__(self, ptr, itemsize):
        self.data = type("P", (), {"ptr": ptr})()
        self.itemsize = itemsize


def test_rows_off_a_16_byte_boundary_keep_16_byte_packs():
    """GPT-2's 50257 classes in bfloat16: dense rows start off 16-byte boundaries; the packs
    stay 16 bytes (the aligned granules that hold each row) while the logits, the targets and
    the gradient share each row's offset, and a plan holds one more pack a row."""
    x, g = _Arr(4096, 2), _Arr(1 << 20, 2)
    assert F.vec_for("bfloat16", 50257, (x, 50257), (g, 50257)) == 8
    assert F.rows_shifted("bfloat16", 50257, x, 50257)
    assert not F.rows_shifted("bfloat16", 50264, x, 50264)
    assert F.vec_for("bfloat16", 50257, (x, 50257), (_Arr(4098, 2), 50257)) == 1  # offsets differ
    assert F.vec_for("float32", 1000, (x, 1000), (g, 1001)) == 1  # row strides differ mod 16 B
    p = F.plan("bfloat16", "label", "int64", 50257, 8, H100, None, shifted=True)
    assert p.variant.vec == 8 and _covers(p, 50257 + 7) >= 50257 + 7
    p = F.plan("float32", "label", "int64", 1001, 4, H100, None, shifted=True)
    assert p.variant.kind in ("warp", "block") and _covers(p, 1004) >= 1004


# -------------------------------------------------------------- host arguments vs the kernels
# The emulator builds its own C++ calls, so the host's argument packing is checked here against
# the kernels' parameter lists, read from the CUDA source: order, pointer or scalar, width.

def _params(text):
    import re

    out = []
    for part in text.replace("\\\n", " ").split(","):
        part = " ".join(part.split())
        if not part:
            continue
        name = re.findall(r"\w+", part)[-1]
        decl = part[: part.rindex(name)].replace("__restrict__", "").replace("const", "").strip()
        out.append((name, "ptr" if decl.endswith("*") else decl))
    return out


def _source_params(kernel):
    import re

    from gpuce._cuda import source

    src = source.expand(F.SOURCE)  # the parameter list is the policy header's
    if kernel == "sce_prologue":
        m = re.search(r"sce_prologue\(([^)]*)\)", src)
        return _params(m.group(1))
    m = re.search(r"#define GPUCE_SCE_PARAMS(.*?)\n\n", src, re.S)
    base = _params(m.group(1))
    return base + ([("P", "int"), ("S", "int")] if kernel in ("warp", "block", "cluster") else [])


class _Dev:
    """A stand-in for a device array: the launch code reads only strides and item size."""

    def __init__(self, shape, itemsize):
        self.shape, self.itemsize = shape, itemsize
        self.strides = (shape[-1] * itemsize, itemsize) if len(shape) == 2 else (itemsize,)


WIDTH = {"long long": np.int64, "int": np.int32, "double": np.float64}


@pytest.mark.parametrize("kind", ["tile", "warp", "block", "cluster", "twopass"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_kernel_arguments_match_the_parameter_list(kind, dtype):
    acc = np.dtype(F.ACC[dtype])
    v = F.Variant(kind, dtype, "label", "int64", F.VEC_MAX[dtype], group=8 if kind == "warp" else 0,
                  cluster=2 if kind == "cluster" else 0)
    p = F.Plan(v, 64, packs=3, stages=2)
    n, c = 5, 40
    x, g, lbl, ws = _Dev((n, c), F.ITEMSIZE[dtype]), _Dev((n, c), F.ITEMSIZE[dtype]), _Dev((n,), 8), _Dev((9,), 8)
    rows, total = _Dev((n,), acc.itemsize), _Dev((), acc.itemsize)
    args = F.kernel_args(p, x, lbl, None, None, acc=acc, eps=0.1, z=0.0, softcap=None, ignore_index=-100, inv=0.5,
                         inv_from_ws=0, loss_out=rows, lse_out=None, correct_out=None, grad_out=g, ws=ws,
                         total_out=total, stats_out=None, bad_out=None)
    params = _source_params(kind)
    assert len(args) == len(params), (len(args), params)
    for (name, decl), a in zip(params, args):
        if decl == "ptr":
            assert isinstance(a, _Dev) or a is None, (name, a)  # None: CuPy passes a null pointer
        else:
            want = acc.type if decl == "A" else WIDTH[decl]
            assert type(a) is want, (name, decl, type(a))
    named = dict(zip([nm for nm, _ in params], args))
    assert named["ldx"] == c and named["ldg"] == c and named["n"] == n and named["c"] == c
    assert named["ignore_index"] == -100 and named["inv_denom"] == 0.5
    assert named["x"] is x and named["grad"] is g and named["loss_out"] is rows and named["ws"] is ws


def test_prologue_arguments_match_the_parameter_list():
    args = F.prologue_args(_Dev((5,), 4), None, 5, 40, -100, True, _Dev((9,), 8))
    params = _source_params("sce_prologue")
    assert len(args) == len(params)
    for (name, decl), a in zip(params, args):
        if decl == "ptr":
            assert isinstance(a, _Dev) or a is None, name
        else:
            assert type(a) is WIDTH[decl], (name, decl, type(a))


def test_host_constants_match_the_kernel_source():
    """The numbers the planner and the workspace share with the CUDA source are the source's."""
    import re

    from gpuce._cuda import source

    src = source.read_source(F.SOURCE)
    macro = {k: int(v) for k, v in re.findall(r"#define (GPUCE_\w+) (\d+)", src)}
    assert macro["GPUCE_TILE_ROWS"] == F.TILE_ROWS
    assert macro["GPUCE_TILE_MAX_C"] == F.TILE_MAX_C
    assert macro["GPUCE_TILE_STAGES"] == F.TILE_STAGES
    assert macro["GPUCE_TEAM_THREADS"] == F.TEAM_MAX_THREADS
    assert macro["GPUCE_WS_PARTIALS"] == F.WS_PARTIALS
    assert macro["GPUCE_NWORDS"] == F.WS_WORDS



def test_cluster_grid_stays_within_the_clusters_held_at_once():
    """A cluster kernel's grid is capped by the clusters the device holds at once (the driver's
    count; clusters share a GPC, so SMs x blocks an SM / CL may overcount), never below one
    cluster, and a multiple of the cluster size; other kernels ignore the count."""
    p = F.plan("float32", "label", "int64", 131072, 4, H100)
    cl = p.variant.cluster
    assert cl == 8
    full = F.grid_blocks(p, 100000, H100, 1)
    assert full == H100.sms // cl * cl
    assert F.grid_blocks(p, 100000, H100, 1, clusters=14) == 14 * cl
    assert F.grid_blocks(p, 100000, H100, 1, clusters=100) == full
    assert F.grid_blocks(p, 3, H100, 1, clusters=14) == 3 * cl  # fewer rows than clusters
    b = F.plan("float32", "label", "int64", 4096, 4, H100)
    assert F.grid_blocks(b, 100000, H100, 4, clusters=2) == F.grid_blocks(b, 100000, H100, 4)


def test_launch_config_layout_is_cudas():
    """The ctypes image of CUlaunchConfig (cuda.h, CUDA 12 and 13) that the cluster count query
    passes: seven unsigned ints, the stream and the attribute pointers, their count."""
    import ctypes

    L = F._LaunchConfig
    assert ctypes.sizeof(L) == 56
    assert (L.sharedMemBytes.offset, L.hStream.offset, L.attrs.offset, L.numAttrs.offset) == (24, 32, 40, 48)


@pytest.mark.parametrize("c", [33, 100, 128])
def test_wide_rows_list_the_tile_after_the_teams(c):
    """Dense rows of 33..128 values: the tile kernel (a thread a row) is a candidate for the
    variants sweep, never the choice; past 128 it is not listed."""
    cands = F.candidates("float32", "label", "int64", c, 4 if c % 4 == 0 else 1, H100, 4)
    kinds = [p.variant.kind for p in cands]
    assert "tile" in kinds and kinds[0] != "tile" and kinds[-1] == "twopass"
    assert "tile" not in [p.variant.kind for p in F.candidates("float32", "label", "int64", 132, 4, H100, 4)]
    assert F.tile_vec_for("float32", 129, *()) is None
