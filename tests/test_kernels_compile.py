"""Every CUDA source gpuce ships compiles through NVRTC for sm_80 and sm_90 -- no GPU needed."""

import pytest

from gpuce._cuda import checks, kernels, nvrtc, source


@pytest.fixture(scope="module")
def results():
    return checks.compile_all(archs=("sm_80", "sm_90"))


def test_everything_compiles(results):
    n_specs = sum(len(s.specializations) for s in kernels.SPECS.values())
    n_raw = len([p for p in source.all_sources() if p.suffix == ".cu"])
    assert n_specs > 0
    assert len(results) == 2 * (n_specs + n_raw)  # each for sm_80 and sm_90
    for r in results:
        assert r.registers, f"no ptxas report for {r.name} ({r.arch}):\n{r.log}"


# The spill rule lives in one place (gpuce._cuda.checks), shared with `gpuce check-kernels`:
# float-accumulating fused kernels spill nothing, double-accumulating ones at most a few ABI
# saves around libdevice calls, the register-stage cluster kernel a few scalars.

def test_no_spills_on_sm90(results):
    spilled = {r.name: r.spills for r in results if r.arch == "sm_90"
               and not checks.is_fused(r.name)
               and any(st or ld for st, ld in r.spills.values())}
    assert not spilled, f"kernels spill to local memory on sm_90: {spilled}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_fused_kernels_within_the_spill_rule(results, arch):
    from gpuce._cuda import checks

    fused = [r for r in results if r.arch == arch and checks.is_fused(r.name)]
    # the cross-entropy, token and distillation programs
    assert sorted(r.name for r in fused) == sorted(
        f"{p}{arch}" for p in ("gpuce_sce_fused_", "gpuce_tokens_", "gpuce_distill_"))
    bad = checks.violations(fused)
    assert not bad, "fused kernels break the spill rule:\n" + "\n".join(map(str, bad))
    # the rule itself: a float kernel may not spill a byte
    assert checks.spill_budget("gpuce_sce_fused_sm_90", "sm_90", "gpuce::sce_team<float, int, float, 0, 4, 0>") == 0


def test_fused_static_shared_memory_within_the_planners_bound(results):
    """The planner sizes the dynamic rings against the opt-in limit minus STATIC_SMEM: every
    fused kernel's own __shared__ scratch must fit in that bound."""
    from gpuce._cuda import fused as F

    for r in results:
        if r.name.startswith("gpuce_sce_fused_"):
            assert r.smem, f"no shared-memory report for {r.name}"
            over = {fn: b for fn, b in r.smem.items() if b > F.STATIC_SMEM}
            assert not over, f"static shared memory above {F.STATIC_SMEM} bytes: {over}"


def test_every_helper_is_used():
    """Each shipped .cuh is pasted into at least one kernel (nothing ships uncompiled): a
    helper of the CuPy kernel specs, or a header a raw .cu file includes (source.expand marks
    each header it pastes with a ``// ---- name ----`` line)."""
    import re

    used = {h for s in kernels.SPECS.values() for h in s.helpers}
    for raw in (p for p in source.all_sources() if p.suffix == ".cu"):
        used |= set(re.findall(r"^// ---- (\S+\.cuh) ----$", source.expand(raw.name), re.M))
    shipped = {p.name for p in source.all_sources() if p.suffix == ".cuh"}
    assert shipped <= used, f"helpers never compiled: {shipped - used}"


def test_broken_source_fails():
    with pytest.raises(RuntimeError, match="NVRTC failed"):
        nvrtc.compile_source("__global__ void k() { undeclared(); }", "broken", "sm_90")


def test_every_fused_variant_compiled(results):
    from gpuce._cuda import fused as F

    fused = {r.arch: r for r in results if r.name.startswith("gpuce_sce_fused_")}
    assert set(fused) == {"sm_80", "sm_90"}
    for arch, r in fused.items():
        cc = int(arch.split("_")[1])
        want = {v.expr() for v in F.variants() if cc >= v.min_arch} | set(F.prologue_exprs())
        assert set(r.lowered) == want
        for expr, entry in r.lowered.items():
            assert entry in r.registers, f"{expr} has no ptxas entry for {arch}"
    # the sm_90 build carries the cluster variants, the sm_80 one cannot
    assert any("sce_cluster" in e for e in fused["sm_90"].lowered)
    assert not any("sce_cluster" in e for e in fused["sm_80"].lowered)


@pytest.mark.parametrize("module,cluster", [("tokens", "tok_cluster"), ("distill", "dis_cluster")])
def test_every_policy_program_variant_compiled(results, module, cluster):
    """The token and distillation programs (the fused bodies through their row-state policies):
    every variant the runtime builds its modules from (``variants()``) is in the program of
    each arch it supports, with a ptxas report, the cluster ones on sm_90 only, within the
    planner's static shared-memory bound and the launch bound of 512 threads a block (at most
    128 registers a thread).  The spill rule is test_fused_kernels_within_the_spill_rule's."""
    import importlib

    from gpuce._cuda import fused as F

    mod = importlib.import_module(f"gpuce._cuda.{module}")
    programs = {r.arch: r for r in results if r.name.startswith(mod.PROGRAM_PREFIX)}
    assert set(programs) == {"sm_80", "sm_90"}
    for arch, r in programs.items():
        cc = int(arch.split("_")[1])
        assert set(r.lowered) == {v.expr() for v in mod.variants() if cc >= v.min_arch}
        for expr, entry in r.lowered.items():
            assert entry in r.registers, f"{expr} has no ptxas entry for {arch}"
            assert r.registers[entry] <= 128, f"{arch} {expr}: {r.registers[entry]} registers"
        assert r.smem and all(b <= F.STATIC_SMEM for b in r.smem.values()), r.smem
    assert any(cluster in e for e in programs["sm_90"].lowered)
    assert not any(cluster in e for e in programs["sm_80"].lowered)


def test_the_ordered_cluster_exchange_compiles_within_the_spill_rule(monkeypatch):
    """GPUCE_XCHG_ORDERED (release stores, acquire polls in the cluster exchange: the form part
    variants of gpu_check.sh times beside the default) compiles for sm_90 for every cluster
    instantiation, within the spill rule; the runtime passes the define only when asked."""
    from gpuce._cuda import fused as F

    monkeypatch.delenv("GPUCE_XCHG_ORDERED", raising=False)
    assert F.compile_options() == ("--std=c++17",)
    monkeypatch.setenv("GPUCE_XCHG_ORDERED", "1")
    opts = F.compile_options()
    assert opts == ("--std=c++17", "-DGPUCE_XCHG_ORDERED")
    exprs = [v.expr() for v in F.variants() if v.cluster]
    assert any("cluster" in e for e in exprs) and any("twopass" in e for e in exprs)
    r = nvrtc.compile_source(source.expand(F.SOURCE), "gpuce_sce_fused_sm_90", "sm_90", opts, exprs)
    assert len(r.lowered) == len(exprs) and r.registers
    assert "st.release.cluster" in source.expand(F.SOURCE)
    bad = checks.violations([r])
    assert not bad, "the ordered exchange breaks the spill rule:\n" + "\n".join(map(str, bad))
