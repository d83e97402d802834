"""gpuce's CuPy host path with the device stubbed out: what a call launches, and what its
Python side costs, on a machine without a GPU.

CuPy arrays are made over fake device addresses (CuPy's UnownedMemory: shapes, strides and
pointers, no device memory), and the device-side calls of the host path are replaced by
stand-ins: allocation (cupy.empty / zeros / full), the device and stream queries, the occupancy
query, and the kernels, which record their launches instead of running.  Any other CuPy
operation needs the device and fails, so a call that completes here launched nothing but what
the stand-ins recorded.  tests/test_host_path.py uses the stand-ins through pytest's
monkeypatch; ``python bench/host_stub.py`` installs them for the process and times calls:

    python bench/host_stub.py [--calls 5000] [--csv bench/results/host_stub.csv --label COMMIT]

The time a call is gpuce's own Python (validation, the launch recipe, argument tuples) plus
the stand-ins' (measured alone and subtracted in the ``own_us`` column): a CPU-side regression
measure of gpuce's part, not the host time a GPU run reports, which adds CuPy's allocations
and launches (bench/probe.py's ``cpu_ms`` of "call, check_labels=False" and its
host_profile.txt are that).
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import time
from pathlib import Path

import numpy as np

H100_LIKE = dict(arch=90, sms=132, smem_optin=227 * 1024)


class StubHost:
    """Fake device memory, and a record of the launches and allocations made through it."""

    def __init__(self):
        self.next = 0x7F00_0000_0000
        self.launches = []  # (expr, grid, block, args, shared_mem)
        self.allocations = []

    def array(self, shape, dtype, record=False):
        """A CuPy array over fresh fake device addresses (512-byte aligned, as CuPy's pool)."""
        import cupy
        from cupy.cuda import memory

        dtype = np.dtype(dtype)
        shape = (shape,) if np.isscalar(shape) else tuple(shape)
        nbytes = max(1, math.prod(shape) * dtype.itemsize)
        mem = memory.UnownedMemory(self.next, nbytes, None, device_id=0)
        self.next += (nbytes + 511) // 512 * 512 + 512
        a = cupy.ndarray(shape, dtype, memptr=memory.MemoryPointer(mem, 0))
        if record:
            self.allocations.append(a)
        return a

    def kernel(self, expr):
        """A stand-in for gpuce._cuda.fused.function(expr): launches are recorded."""
        host = self

        class Kernel:
            max_dynamic_shared_size_bytes = 227 * 1024

            def __call__(self, grid, block, args, shared_mem=0):
                host.launches.append((expr, grid, block, args, shared_mem))

        return Kernel()


class _Stream:
    ptr = 0

    def is_capturing(self):
        return False


def install(host: StubHost, setattr_=setattr, per_sm: int = 2):
    """Replace the device-side calls of gpuce's CuPy host path by ``host``'s stand-ins, with
    ``setattr_`` (pytest's ``monkeypatch.setattr`` undoes them after a test).  The launch
    recipes and workspaces start empty; the device is H100-like with ``per_sm`` blocks an SM."""
    import cupy

    from gpuce._cuda import fused

    def empty(shape, dtype=float, order="C"):
        return host.array(shape, dtype, True)

    def full(shape, value, dtype=None, order="C"):
        return host.array(shape, dtype, True)

    real_asarray = cupy.asarray

    def asarray(a, dtype=None, *args, **kw):  # CuPy's own asks the device which one holds `a`
        if isinstance(a, cupy.ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        return real_asarray(a, dtype, *args, **kw)

    stream = _Stream()
    dev = fused.Device(**H100_LIKE)
    setattr_(cupy, "empty", empty)
    setattr_(cupy, "zeros", empty)
    setattr_(cupy, "full", full)
    setattr_(cupy, "asarray", asarray)
    setattr_(cupy.cuda.runtime, "getDevice", lambda: 0)
    setattr_(cupy.cuda, "get_current_stream", lambda: stream)
    setattr_(fused, "_device", lambda dev_id: dev)
    setattr_(fused, "function", host.kernel)
    setattr_(fused, "_occupancy_on", lambda dev_id, expr, threads, smem: per_sm)
    setattr_(fused, "_clusters_on", lambda dev_id, expr, threads, smem, cl: None)
    setattr_(fused, "_RECIPES", {})
    setattr_(fused, "_WORKSPACES", fused._ThreadWorkspaces())
    return dev


CASES = [  # name, N, C, logits dtype, label dtype, options
    ("float32 4096x4096 mean, grad", 4096, 4096, "float32", "int64", dict(return_grad=True)),
    ("float32 2^20x10 int32 mean, grad", 2**20, 10, "float32", "int32", dict(return_grad=True)),
    ("float32 4096x4096 sum, grad", 4096, 4096, "float32", "int64", dict(return_grad=True, reduction="sum")),
    ("bfloat16 8192x32768 mean, grad", 8192, 32768, "bfloat16", "int64", dict(return_grad=True)),
    ("float32 4096x4096 none, no grad", 4096, 4096, "float32", "int64", dict(reduction="none")),
]


def _best(fn, calls, repeat=5) -> float:
    """Microseconds a call of ``fn``: the best of ``repeat`` timings of ``calls`` calls."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t) / calls * 1e6)
    return min(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--csv", type=Path, default=None, help="append tidy rows here")
    ap.add_argument("--label", default="", help="the code measured (e.g. a commit), a column of the CSV")
    a = ap.parse_args(argv)
    import gpuce
    from gpuce._validation import bfloat16_dtype

    host = StubHost()
    install(host)
    rows = []
    k = host.kernel("stub")
    args = tuple(host.array((4,), np.float32) for _ in range(12)) + (np.int32(0),) * 14
    stub_launch = _best(lambda: k((1,), (1,), args), a.calls)
    stub_alloc = _best(lambda: host.array((4096, 4096), np.float32), a.calls)
    for name, n, c, dtype, index, opts in CASES:
        dt = bfloat16_dtype() if dtype == "bfloat16" else np.dtype(dtype)
        x, y = host.array((n, c), dt), host.array((n,), index)

        def call():
            return gpuce.softmax_cross_entropy(x, y, check_labels=False, **opts)

        for _ in range(200):
            call()
        host.launches.clear()
        host.allocations.clear()
        best = [_best(call, a.calls, repeat=1) for _ in range(5)]
        launches, allocations = (len(r) // (5 * a.calls) for r in (host.launches, host.allocations))
        stub = launches * stub_launch + allocations * stub_alloc
        rows.append(dict(code=a.label, machine=platform.node() or "unknown", python=platform.python_version(), case=name,
                         us_per_call=f"{min(best):.1f}", own_us=f"{min(best) - stub:.1f}", launches=launches,
                         allocations=allocations))
        print(f"{name:36s} {min(best):6.1f} us a call, {min(best) - stub:6.1f} us gpuce's own "
              f"({launches} launches, {allocations} allocations stubbed)", flush=True)
    if a.csv:
        new = not a.csv.exists()
        with a.csv.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
