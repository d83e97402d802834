"""Every instantiation of the fused token kernels (gpuce._cuda.tokens.variants(), the list the
runtime builds its modules from) compiles through NVRTC for sm_80 and sm_90 within the fused
kernels' spill rule (gpuce._cuda.checks) -- no GPU needed.  The registers of every entry are
printed (``pytest -s``) as the report."""

import dataclasses

import pytest

from gpuce._cuda import checks
from gpuce._cuda import fused as F
from gpuce._cuda import tokens as TK

ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("cupy")
    return {r.arch: r for r in TK.compile_all(ARCHS)}


def test_every_variant_compiled(results):
    assert set(results) == set(ARCHS)
    for arch, r in results.items():
        cc = int(arch.split("_")[1])
        want = {v.expr() for v in TK.variants() if cc >= v.min_arch}
        assert set(r.lowered) == want
        for expr, entry in r.lowered.items():
            assert entry in r.registers, f"{expr} has no ptxas entry for {arch}"
    assert any("tok_cluster" in e for e in results["sm_90"].lowered)
    assert not any("tok_cluster" in e for e in results["sm_80"].lowered)


@pytest.mark.parametrize("arch", ARCHS)
def test_within_the_fused_spill_rule(results, arch):
    """The rule of the fused kernels (checks.spill_budget for the fused program): a float
    instantiation spills nothing and has no stack frame, a double one at most the ABI budget."""
    r = results[arch]
    as_fused = dataclasses.replace(r, name=f"{checks.FUSED_PROGRAM_PREFIX}tokens_{arch}")
    bad = checks.violations([as_fused])
    assert not bad, "token kernels break the spill rule:\n" + "\n".join(map(str, bad))
    floats = [e for e in r.lowered if not checks.accumulates_in_double(e)]
    assert floats and all(checks.spill_budget(as_fused.name, arch, e) == 0 for e in floats)


def test_static_shared_memory_within_the_planners_bound(results):
    """The planner sizes the rings against the opt-in limit minus STATIC_SMEM."""
    for r in results.values():
        assert r.smem, f"no shared-memory report for {r.name}"
        over = {fn: b for fn, b in r.smem.items() if b > F.STATIC_SMEM}
        assert not over, f"static shared memory above {F.STATIC_SMEM} bytes: {over}"


def test_register_report(results):
    """Registers, spills and stack of every entry (printed), within the launch bound of 512
    threads a block (at most 128 registers a thread)."""
    lines = []
    for arch, r in results.items():
        for expr, entry in sorted(r.lowered.items()):
            st, ld = r.spills.get(entry, (0, 0))
            lines.append(f"{arch} {expr}: {r.registers[entry]} registers, spill {st}/{ld} B, "
                         f"stack {r.stack.get(entry, 0)} B")
            assert r.registers[entry] <= 128, lines[-1]
    print("\n" + "\n".join(lines))
