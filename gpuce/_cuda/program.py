"""A raw program of the fused bodies through a row-state policy other than cross-entropy's (the
token rows, distillation): what every such program needs beside its variants and its launch,
written once.  ``PolicyProgram(source, prefix, variants)`` gives the set of instantiations
compiled (:meth:`compiled`), the RawKernel of one (:meth:`function`, one module an
instantiation, as :func:`gpuce._cuda.fused.function`), the blocks an SM holds
(:meth:`blocks_per_sm`) and the offline NVRTC compile of every instantiation an arch supports
(:meth:`compile_all`, a program an arch, named ``<prefix><arch>``).  Nothing here imports CuPy at
import time."""

from __future__ import annotations

import functools

from . import fused as F


class PolicyProgram:
    """One program: ``source`` (a .cu file under kernels/), the NVRTC program name ``prefix``
    and ``variants`` (a function returning the instantiations, each with ``expr()`` and
    ``min_arch``).  Instances live at module level, one a program, so the memoized methods
    hold their results for the process."""

    def __init__(self, source: str, prefix: str, variants):
        self.source = source
        self.prefix = prefix
        self._variants = variants

    def __repr__(self):
        return f"PolicyProgram({self.source!r})"

    @functools.cached_property
    def compiled(self) -> frozenset:
        """Every instantiation the program holds."""
        return frozenset(self._variants())

    @functools.lru_cache(maxsize=None)
    def _module(self, exprs: tuple):
        import cupy

        from . import source

        return cupy.RawModule(code=source.expand(self.source), options=("--std=c++17",),
                              name_expressions=exprs)

    @functools.lru_cache(maxsize=None)
    def function(self, expr: str):
        """The RawKernel of ``expr``, made once a process."""
        return self._module((expr,)).get_function(expr)

    @functools.lru_cache(maxsize=1024)
    def blocks_per_sm(self, dev_id: int, expr: str, threads: int, smem: int, shape) -> int:
        """Blocks of ``expr`` an SM holds (the driver's occupancy API, after the shared-memory
        limit is raised; the estimate from threads and shared memory where it cannot answer)."""
        from cupy_backends.cuda.api import driver

        fn = F._prepare(self.function(expr), smem)
        try:
            per_sm = int(driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads,
                                                                          smem))
        except Exception:  # noqa: BLE001
            per_sm = 0
        if per_sm < 1:
            return F.occupancy_estimate(shape, F.current_device())
        return min(F.MAX_BLOCKS_PER_SM, per_sm)

    @functools.lru_cache(maxsize=None)
    def compile_all(self, archs=("sm_80", "sm_90")) -> tuple:
        """Every instantiation an arch supports, one NVRTC program an arch (the text the runtime
        compiles), the archs compiled on threads at once (NVRTC does not hold Python's lock):
        a tuple of :class:`gpuce._cuda.nvrtc.CompileResult` named ``<prefix><arch>``.
        Memoized: the suite and ``gpuce check-kernels`` share it.  No GPU needed."""
        from concurrent.futures import ThreadPoolExecutor

        from . import nvrtc, source

        src = source.expand(self.source)

        def one(arch):
            cc = int(arch.split("_")[1])
            exprs = [v.expr() for v in self._variants() if cc >= v.min_arch]
            return nvrtc.compile_source(src, f"{self.prefix}{arch}", arch, ("--std=c++17",),
                                        exprs)

        with ThreadPoolExecutor(max_workers=len(archs)) as pool:
            return tuple(pool.map(one, archs))
