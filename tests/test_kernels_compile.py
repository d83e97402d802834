"""Every CUDA source gpuce ships compiles through NVRTC for sm_80 and sm_90 -- no GPU needed."""

import pytest

from gpuce import _cupy_kernels, _kernel_source, _nvrtc


@pytest.fixture(scope="module")
def results():
    return _nvrtc.compile_all(archs=("sm_80", "sm_90"))


def test_everything_compiles(results):
    n_specs = sum(len(s.specializations) for s in _cupy_kernels.SPECS.values())
    n_raw = len([p for p in _kernel_source.all_sources() if p.suffix == ".cu"])
    assert n_specs > 0
    assert len(results) == 2 * (n_specs + n_raw)  # each for sm_80 and sm_90
    for r in results:
        assert r.registers, f"no ptxas report for {r.name} ({r.arch}):\n{r.log}"


# The fused kernels keep rows in shared memory, not registers, so a float-accumulating kernel
# must spill nothing.  The double-accumulating ones call libdevice's exp / log / tanh (not
# inlined), and ptxas saves a few registers around those calls: they may spill at most this
# many bytes each way (a demoted per-thread array would exceed it).
DOUBLE_ABI_SPILL_BUDGET = 128


def test_no_spills_on_sm90(results):
    spilled = {r.name: r.spills for r in results if r.arch == "sm_90"
               and not r.name.startswith("gpuce_sce_fused_")
               and any(st or ld for st, ld in r.spills.values())}
    assert not spilled, f"kernels spill to local memory on sm_90: {spilled}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_fused_kernels_do_not_spill(results, arch):
    (r,) = [r for r in results if r.arch == arch and r.name.startswith("gpuce_sce_fused_")]
    names = {entry: expr for expr, entry in r.lowered.items()}
    over = {}
    for fn, sp in r.spills.items():
        expr = names.get(fn, fn)
        budget = DOUBLE_ABI_SPILL_BUDGET if ", double," in expr or "double>" in expr else 0
        if max(sp) > budget or (r.stack.get(fn) or 0) > budget:
            over[expr] = (sp, r.stack.get(fn))
    assert not over, f"fused kernels spill: {over}"


def test_every_helper_is_used():
    """Each shipped .cuh is pasted into at least one kernel (nothing ships uncompiled)."""
    used = {h for s in _cupy_kernels.SPECS.values() for h in s.helpers}
    shipped = {p.name for p in _kernel_source.all_sources() if p.suffix == ".cuh"}
    assert shipped <= used, f"helpers never compiled: {shipped - used}"


def test_broken_source_fails():
    with pytest.raises(RuntimeError, match="NVRTC failed"):
        _nvrtc.compile_source("__global__ void k() { undeclared(); }", "broken", "sm_90")


def test_every_fused_variant_compiled(results):
    from gpuce import _fused

    fused = {r.arch: r for r in results if r.name.startswith("gpuce_sce_fused_")}
    assert set(fused) == {"sm_80", "sm_90"}
    for arch, r in fused.items():
        cc = int(arch.split("_")[1])
        want = {v.expr() for v in _fused.variants() if cc >= v.min_arch} | set(_fused.denominator_exprs())
        assert set(r.lowered) == want
        for expr, entry in r.lowered.items():
            assert entry in r.registers, f"{expr} has no ptxas entry for {arch}"
    # the sm_90 build carries the cluster variants, the sm_80 one cannot
    assert any("sce_cluster" in e for e in fused["sm_90"].lowered)
    assert not any("sce_cluster" in e for e in fused["sm_80"].lowered)
