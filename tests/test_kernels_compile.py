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


# The fused warp / block / cluster kernels run under __launch_bounds__(256, 3) (80 registers);
# ptxas then parks a few per-row scalars (pointers, row constants) in local memory.  What must
# never go there is the register-resident row (32 values a thread, 128 bytes in float32), so a
# fused kernel may spill at most this many bytes each way and keep at most this stack frame.
FUSED_SPILL_BUDGET = 64


def test_no_spills_on_sm90(results):
    spilled = {r.name: r.spills for r in results if r.arch == "sm_90"
               and not r.name.startswith("gpuce_sce_fused_")
               and any(st or ld for st, ld in r.spills.values())}
    assert not spilled, f"kernels spill to local memory on sm_90: {spilled}"


def test_fused_rows_stay_in_registers_on_sm90(results):
    (r,) = [r for r in results if r.arch == "sm_90" and r.name.startswith("gpuce_sce_fused_")]
    names = {entry: expr for expr, entry in r.lowered.items()}
    over = {names.get(fn, fn): (sp, r.stack.get(fn)) for fn, sp in r.spills.items()
            if max(sp) > FUSED_SPILL_BUDGET or (r.stack.get(fn) or 0) > FUSED_SPILL_BUDGET}
    assert not over, f"fused kernels spill more than {FUSED_SPILL_BUDGET} bytes: {over}"
    # the kernels without a register cap spill nothing at all
    free = {names.get(fn, fn): sp for fn, sp in r.spills.items()
            if ("sce_tile" in names.get(fn, "") or "sce_twopass" in names.get(fn, "")) and max(sp)}
    assert not free, free


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
        want = {v.expr() for v in _fused.variants() if cc >= v.min_arch}
        assert set(r.lowered) == want
        for expr, entry in r.lowered.items():
            assert entry in r.registers, f"{expr} has no ptxas entry for {arch}"
    # the sm_90 build carries the cluster variants, the sm_80 one cannot
    assert any("sce_cluster" in e for e in fused["sm_90"].lowered)
    assert not any("sce_cluster" in e for e in fused["sm_80"].lowered)
