"""The rule every compiled kernel must meet, in one place: ``gpuce check-kernels`` and the test
suite (tests/test_kernels_compile.py) apply the same one.

ptxas's report (read from NVRTC's program log by :mod:`gpuce._cuda.nvrtc`) gives each entry
function's registers, stack frame and spill stores/loads.  The rule:

* every program has a ptxas report (registers for at least one entry);
* the fused kernels (programs ``gpuce_sce_fused_<arch>``, ``gpuce_tokens_<arch>`` and
  ``gpuce_distill_<arch>``, every arch) keep rows in shared
  memory, not registers, so a float-accumulating instantiation spills nothing and has no stack
  frame -- the register-stage cluster kernel (``sce_cluster_regs``: 16 packs, 64 registers, of
  a float32 row a thread) included, since it dropped the softcap path that spilled it (softcap
  calls are planned onto other kernels).  A double-accumulating one calls libdevice's exp /
  log / tanh (not inlined) and ptxas saves a few registers around those calls: it may spill,
  and keep a stack frame of, at most :data:`DOUBLE_ABI_SPILL_BUDGET` bytes each way (a demoted
  per-thread array would exceed it);
* every other kernel (the portable path's specs) spills nothing on sm_90.
"""

from __future__ import annotations

from dataclasses import dataclass

DOUBLE_ABI_SPILL_BUDGET = 128
FUSED_PROGRAM_PREFIX = "gpuce_sce_fused_"
# every raw program built on the fused row-state bodies: cross-entropy, token log-probabilities
# and entropy, distillation (one NVRTC program an arch each)
FUSED_PROGRAM_PREFIXES = (FUSED_PROGRAM_PREFIX, "gpuce_tokens_", "gpuce_distill_")


def is_fused(program: str) -> bool:
    return program.startswith(FUSED_PROGRAM_PREFIXES)


def accumulates_in_double(expr: str) -> bool:
    """True for a fused template instantiation whose accumulation type is double."""
    return ", double," in expr or "double>" in expr


def spill_budget(program: str, arch: str, expr: str):
    """Bytes the entry ``expr`` of ``program`` may spill on ``arch``; None where the rule
    does not look (non-fused kernels on an arch other than sm_90)."""
    if is_fused(program):
        return DOUBLE_ABI_SPILL_BUDGET if accumulates_in_double(expr) else 0
    return 0 if arch == "sm_90" else None


@dataclass(frozen=True)
class Violation:
    program: str
    arch: str
    entry: str  # the template expression where known, else the mangled name
    why: str

    def __str__(self):
        return f"{self.entry} ({self.program}, {self.arch}): {self.why}"


def entry_names(result) -> dict:
    """Mangled entry name -> template expression (for instantiated templates)."""
    return {mangled: expr for expr, mangled in (result.lowered or {}).items()}


def violations(results) -> list[Violation]:
    """Every breach of the rule above in ``results`` (:class:`gpuce._cuda.nvrtc.CompileResult`)."""
    out = []
    for r in results:
        if not r.registers:
            out.append(Violation(r.name, r.arch, r.name, "no ptxas report in NVRTC's log"))
            continue
        names = entry_names(r)
        for fn, (stores, loads) in r.spills.items():
            expr = names.get(fn, fn)
            budget = spill_budget(r.name, r.arch, expr)
            if budget is None:
                continue
            stack = r.stack.get(fn) or 0
            if is_fused(r.name):
                over = max(stores, loads) > budget or stack > budget
            else:
                over = bool(stores or loads)
            if over:
                out.append(Violation(r.name, r.arch, expr,
                                     f"spill stores {stores} B, loads {loads} B, stack {stack} B "
                                     f"(budget {budget} B)"))
    return out


def compile_all(archs=("sm_80", "sm_90")) -> list:
    """Every program gpuce ships, compiled through NVRTC (no GPU needed): the kernel specs
    and the fused cross-entropy program (:func:`gpuce._cuda.nvrtc.compile_all`), the token and
    the distillation programs; the rule above applies to all of them."""
    from . import distill, nvrtc, tokens

    return (nvrtc.compile_all(archs) + list(tokens.compile_all(tuple(archs)))
            + list(distill.compile_all(tuple(archs))))


def compile_jobs(archs):
    """The NVRTC programs :func:`compile_all` builds, one callable each (with a
    label), in the same order, so that a caller can show progress."""
    from . import kernels, nvrtc

    jobs = []
    for spec in kernels.SPECS.values():
        for types in spec.specializations:
            for arch in archs:
                name = spec.kernel_name(types)
                jobs.append((f"{name} {arch}",
                             lambda spec=spec, types=types, name=name, arch=arch:
                             [nvrtc.compile_source(nvrtc.harness_source(spec, types), name, arch)]))
    for arch in archs:
        jobs.append((f"{FUSED_PROGRAM_PREFIX}{arch} (every fused variant)",
                     lambda arch=arch: nvrtc.compile_fused((arch,))))
    from . import distill, tokens

    for mod in (tokens, distill):
        for arch in archs:
            jobs.append((f"{mod.PROGRAM_PREFIX}{arch} (every variant)",
                         lambda mod=mod, arch=arch: list(mod.compile_all((arch,)))))
    return jobs
