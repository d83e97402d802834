"""Offline compile check: every CUDA source gpuce ships, through NVRTC, no GPU needed.

CuPy generates the full kernel around each ElementwiseKernel / ReductionKernel
snippet at run time, on a GPU.  Here we place each snippet, for every dtype
specialisation gpuce launches, into a kernel of the same shape (CuPy's headers,
typedefs for the placeholders, const inputs, output references, the reduce /
post-map macros) and compile it with NVRTC using the options CuPy passes, for
each target architecture.  Raw kernels in ``kernels/*.cu`` are compiled as they
are.  ptxas's resource report (``-Xptxas=-v``) is parsed so that tests can fail
on spills.

Needs the NVRTC shared library (the ``nvidia-cuda-nvrtc`` wheel) and CuPy's
headers (any ``cupy-cuda*`` wheel); neither needs a driver.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import kernels, source

CUPY_HEADERS = (
    "cupy/complex.cuh",
    "cupy/carray.cuh",
    "cupy/atomics.cuh",
    "cupy/math_constants.h",
    "cupy/float16.cuh",
    "cupy/bfloat16.cuh",
)

_DTYPE_NAMES = {"bool", "int32", "int64", "float16", "bfloat16", "float32", "float64"}


@dataclass
class CompileResult:
    name: str
    arch: str
    log: str
    registers: dict  # entry function -> registers used
    spills: dict  # entry function -> (spill stores, spill loads) in bytes
    stack: dict  # entry function -> stack frame bytes
    lowered: dict = None  # name expression -> entry function (template instantiations)
    smem: dict = None  # entry function -> static shared memory bytes


def cupy_options() -> tuple:
    """The options CuPy's compile_with_cache passes to NVRTC (headers, C++ std, CUDA include)."""
    from cupy._core import core

    opts = core.assemble_cupy_compiler_options(())
    # added by cupy.cuda.compiler for every NVRTC compile
    return tuple(opts) + ("-ftz=true", "--device-as-default-execution-space")


def _parse_params(text: str):
    out = []
    for part in text.split(","):
        words = part.split()
        raw = words[0] == "raw"
        if raw:
            words = words[1:]
        out.append((raw, words[0], words[1]))
    return out


def _ctype(tok: str, types: dict) -> str:
    if tok in _DTYPE_NAMES:
        return kernels.CTYPE[tok]
    return tok  # placeholder: typedef'd below


def harness_source(spec, types: dict) -> str:
    """A kernel of CuPy's shape around ``spec``'s snippets, for one specialization."""
    lines = [f"#include <{h}>" for h in CUPY_HEADERS]
    for k, v in sorted(types.items()):
        lines.append(f"typedef {kernels.CTYPE[v]} {k};")
    lines.append(source.preamble(*spec.helpers))
    ins = _parse_params(spec.in_params)
    outs = _parse_params(spec.out_params)
    args, body = [], []
    for raw, tok, name in ins:
        ct = _ctype(tok, types)
        if raw:
            args.append(f"const {ct}* {name}")
        else:
            args.append(f"const {ct}* _raw_{name}")
            body.append(f"const {ct} {name} = _raw_{name}[_j];")
    for raw, tok, name in outs:
        ct = _ctype(tok, types)
        args.append(f"{ct}* {name}" if raw else f"{ct}* _raw_{name}")
    kname = spec.kernel_name(types)
    if spec.kind == "elementwise":
        out_refs = [f"{_ctype(t, types)}& {n} = _raw_{n}[i];" for raw, t, n in outs if not raw]
        lines.append(
            f'extern "C" __global__ void {kname}({", ".join(args + ["long long _n"])}) {{\n'
            "  for (ptrdiff_t i = blockIdx.x * (ptrdiff_t)blockDim.x + threadIdx.x; i < _n;"
            " i += (ptrdiff_t)blockDim.x * gridDim.x) {\n"
            "    ptrdiff_t _j = i;\n    "
            + "\n    ".join(body + out_refs)
            + f"\n    {spec.operation};\n  }}\n}}"
        )
    else:
        rtype = spec.substitute(spec.reduce_type, types)
        map_expr = spec.substitute(spec.map_expr, types)
        out_refs = [f"{_ctype(t, types)}& {n} = _raw_{n}[blockIdx.x];" for raw, t, n in outs]
        lines.append(f"typedef {rtype} _type_reduce;")
        lines.append(f"#define REDUCE(a, b) ({spec.reduce_expr})")
        lines.append(f"#define POST_MAP(a) ({spec.post_map_expr})")
        lines.append(
            f'extern "C" __global__ void {kname}({", ".join(args + ["long long _n"])}) {{\n'
            "  __shared__ _type_reduce _sdata[256];\n"
            f"  _type_reduce _s = _type_reduce({spec.identity});\n"
            "  for (ptrdiff_t _j = threadIdx.x; _j < _n; _j += blockDim.x) {\n    "
            + "\n    ".join(body)
            + f"\n    _type_reduce _a = static_cast<_type_reduce>({map_expr});\n"
            "    _s = REDUCE(_s, _a);\n  }\n"
            "  _sdata[threadIdx.x] = _s;\n  __syncthreads();\n"
            "  if (threadIdx.x == 0) {\n"
            "    for (int _k = 1; _k < blockDim.x; ++_k) { _type_reduce _b = _sdata[_k]; _s = REDUCE(_s, _b); }\n    "
            + "\n    ".join(out_refs)
            + "\n    POST_MAP(_s);\n  }\n}"
        )
    return "\n".join(lines) + "\n"


_REG = re.compile(r"Function properties for (\S+)\s*\n\s*ptxas\s*\.\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Compiling entry function '(\S+)'.*?Used (\d+) registers", re.S)
_SMEM = re.compile(r"Compiling entry function '(\S+)'[^\n]*\n(?:(?!Compiling entry)[^\n]*\n)*?[^\n]*?(\d+) bytes smem")


def compile_source(source: str, name: str, arch: str, extra_options=(),
                   name_expressions=()) -> CompileResult:
    """Compile ``source`` to a cubin for ``arch`` (e.g. "sm_90"); raise on any error.

    ``name_expressions`` instantiate templates (as CuPy's RawModule does); the result's
    ``lowered`` maps each expression to its mangled entry name.
    """
    from cupy.cuda import nvrtc

    opts = list(cupy_options()) + [f"-arch={arch}", "-Xptxas=-v"] + list(extra_options)
    prog = nvrtc.createProgram(source, name + ".cu", [], [])
    lowered = {}
    try:
        for expr in name_expressions:
            nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            raise RuntimeError(
                f"NVRTC failed on {name} for {arch}: {e}\n{nvrtc.getProgramLog(prog)}"
            ) from None
        log = nvrtc.getProgramLog(prog)
        for expr in name_expressions:
            lowered[expr] = nvrtc.getLoweredName(prog, expr)
        cubin = nvrtc.getCUBIN(prog)
        if not cubin:
            raise RuntimeError(f"NVRTC produced no cubin for {name} ({arch})")
    finally:
        nvrtc.destroyProgram(prog)
    regs, spills, stack, smem = {}, {}, {}, {}
    for fn, r in _USED.findall(log):
        regs[fn] = int(r)
    for fn, b in _SMEM.findall(log):
        smem[fn] = int(b)
    for fn, st, ss, sl in _REG.findall(log):
        stack[fn] = int(st)
        spills[fn] = (int(ss), int(sl))
    return CompileResult(name, arch, log, regs, spills, stack, lowered, smem)


def compile_all(archs=("sm_80", "sm_90")) -> list[CompileResult]:
    """Compile every kernel spec specialization and the fused cross-entropy program (every
    shipped program: :func:`gpuce._cuda.checks.compile_all`)."""
    results = []
    for spec in kernels.SPECS.values():
        for types in spec.specializations:
            src = harness_source(spec, types)
            for arch in archs:
                results.append(compile_source(src, spec.kernel_name(types), arch))
    results.extend(compile_fused(archs))
    return results


def compile_fused(archs=("sm_80", "sm_90")) -> list[CompileResult]:
    """The fused raw kernels: every instantiation of :func:`gpuce._cuda.fused.variants` an arch
    supports, in one NVRTC program per arch (the text the runtime compiles)."""
    from . import fused

    src = source.expand(fused.SOURCE)
    out = []
    for arch in archs:
        cc = int(arch.split("_")[1])
        exprs = [v.expr() for v in fused.variants() if cc >= v.min_arch] + fused.prologue_exprs()
        out.append(compile_source(src, f"gpuce_sce_fused_{arch}", arch, ("--std=c++17",), exprs))
    return out
