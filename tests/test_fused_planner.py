"""The fused kernels' host logic that needs no GPU: the variant list and the chooser."""

import pytest

from gpuce import _fused as F

H100 = F.Device(arch=90, sms=132, smem_optin=227 * 1024)
A100 = F.Device(arch=80, sms=108, smem_optin=163 * 1024)


def _capacity(v, c):
    """Columns the variant's team covers with its launch configuration."""
    if v.kind == "warp":
        return v.group * v.items * v.vec
    if v.kind in ("block", "cluster"):
        return max(1, v.cluster) * F.block_threads(v, c) * v.per_thread()
    return c


@pytest.mark.parametrize("dtype,c,vec,tile_vec,kind,extra", [
    ("float32", 10, 1, 4, "tile", None),  # dense tiny rows: the tile, vectorised over the tile
    ("float32", 10, 1, None, "warp", (4, 4)),  # not dense: 4 lanes x 4 values, 8 rows a warp
    ("float32", 100, 4, None, "warp", (4, 8)),  # 8 rows a warp, 8 loads in flight a lane
    ("float32", 500, 4, None, "warp", (16, 8)),
    ("float32", 1000, 4, None, "warp", (32, 8)),
    ("float32", 1000, 1, None, "block", None),  # unaligned rows: 16 scalars a thread
    ("float32", 4096, 4, None, "block", None),
    ("float32", 32768, 4, None, "cluster", (4, 0)),
    ("float16", 96 * 1024, 8, None, "cluster", (8, 4)),
    ("float32", 131072, 4, None, "cluster", (8, 8)),
    ("float32", 262144, 4, None, "cluster", (8, 24)),
    ("float64", 262144, 2, None, "twopass", None),  # 2 MiB a row: more than 8 SMs hold
])
def test_choose_on_h100(dtype, c, vec, tile_vec, kind, extra):
    v = F.choose(dtype, "int64", c, vec, H100, tile_vec)
    assert v.kind == kind
    if kind == "warp":
        assert (v.group, v.items) == extra
    if kind == "cluster":
        assert (v.cluster, v.sitems) == extra
    if kind in ("block", "cluster"):
        assert F.block_threads(v, c) <= F.MAX_TEAM_THREADS
        assert F.smem_bytes(v, c) <= H100.smem_optin - 1024
    assert _capacity(v, c) >= c
    assert v in F.variants()  # every choice is compiled by the NVRTC test


@pytest.mark.parametrize("c", [3, 10, 32, 100, 1000, 4096, 32768, 131072, 262144])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_every_candidate_fits_and_is_compiled(dtype, c):
    vec = F.VEC_MAX[dtype] if c % F.VEC_MAX[dtype] == 0 else 1
    cands = F.candidates(dtype, "prob", c, vec, H100, F.VEC_MAX[dtype] if c <= F.TILE_MAX_C else None)
    assert cands[-1].kind == "twopass"
    assert len({(v.kind, v.sitems > 0, v.ahead) for v in cands}) == len(cands)
    for v in cands:
        assert F.fits(v, c, H100) and _capacity(v, c) >= c
        assert v in F.variants()


def test_no_cluster_before_sm90():
    v = F.choose("float32", "int64", 262144, 4, A100)
    assert v.kind == "twopass"
    assert all(v.kind != "cluster" for v in F.candidates("float32", "int64", 32768, 4, A100))
    assert F.choose("float32", "int64", 32768, 4, A100).kind == "block"  # registers + cp.async


def test_threads_and_grid():
    v = F.choose("float32", "int64", 32768, 4, H100)
    t = F.block_threads(v, 32768)
    assert t % 32 == 0 and 64 <= t <= 256
    v = F.choose("float32", "int64", 262144, 4, H100)
    assert F.grid_blocks(v, 1000, 262144, H100) % v.cluster == 0
    v = F.choose("float32", "int64", 12, 4, H100)
    assert v.kind == "warp" and v.group == 4
    # 64 rows per 256-thread block with 4 lanes a row
    assert F.grid_blocks(v, 6400, 12, H100) == 100


def test_variant_names_are_unique():
    exprs = [v.expr() for v in F.variants()]
    assert len(exprs) == len(set(exprs))
    assert all(e.startswith("gpuce::sce_") for e in exprs)


def test_label_ahead_forms_follow_the_measured_ones():
    """The label-a-row-ahead kernels are candidates (tests and the benchmark run them) but not
    the chooser's pick until a GPU run has measured them."""
    cands = F.candidates("float32", "int64", 4096, 4, H100)
    ahead = [v for v in cands if v.ahead]
    assert ahead and not cands[0].ahead
    assert [v.kind for v in ahead] == [v.kind for v in cands if not v.ahead and v.kind != "twopass"]
    assert all(v in F.variants() for v in ahead)
    assert not any(v.ahead for v in F.candidates("float32", "prob", 4096, 4, H100))
    assert F.Variant("warp", "float32", "int64", 4, 8, 32, ahead=True).expr().endswith(", 8, 32, true>")
