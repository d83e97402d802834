"""The fused kernels' host logic that needs no GPU: the variant list and the chooser."""

import pytest

from gpuce import _fused as F

H100 = F.Device(arch=90, sms=132, smem_optin=227 * 1024)
A100 = F.Device(arch=80, sms=108, smem_optin=163 * 1024)


@pytest.mark.parametrize("dtype,c,vec,kind,extra", [
    ("float32", 10, 4, "regs", (4, 1)),
    ("float32", 100, 4, "regs", (32, 1)),
    ("float32", 1000, 4, "regs", (32, 8)),
    ("float32", 1000, 1, "smem", None),
    ("float32", 4096, 4, "smem", None),
    ("float32", 32768, 4, "smem", None),
    ("float16", 96 * 1024, 8, "smem", None),
    ("float32", 131072, 4, "cluster", 4),
    ("float32", 262144, 4, "cluster", 8),
    ("float64", 262144, 2, "twopass", None),  # 2 MiB a row: more than 8 SMs' shared memory
])
def test_choose_on_h100(dtype, c, vec, kind, extra):
    v = F.choose(dtype, "int64", c, vec, H100)
    assert v.kind == kind
    if kind == "regs":
        assert (v.group, v.items) == extra and v.capacity() >= c
    if kind == "cluster":
        assert v.cluster == extra
        assert F.smem_bytes(v, c) <= H100.smem_optin - 1024
    assert v in F.variants()  # every choice is compiled by the NVRTC test


def test_no_cluster_before_sm90():
    v = F.choose("float32", "int64", 131072, 4, A100)
    assert v.kind == "twopass"
    assert v in F.variants()


def test_threads_and_grid():
    v = F.choose("float32", "int64", 32768, 4, H100)
    t = F.block_threads(v, 32768)
    assert t % 32 == 0 and 128 <= t <= 1024
    v = F.choose("float32", "int64", 262144, 4, H100)
    assert F.grid_blocks(v, 1000, 262144, H100) % v.cluster == 0
    v = F.choose("float32", "int64", 10, 4, H100)
    # 64 rows per 256-thread block with 4 lanes a row
    assert F.grid_blocks(v, 6400, 10, H100) == 100


def test_variant_names_are_unique():
    exprs = [v.expr() for v in F.variants()]
    assert len(exprs) == len(set(exprs))
    assert all(e.startswith("gpuce::sce_") for e in exprs)
