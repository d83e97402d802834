"""The fused RawKernels executed on the host by a small SIMT emulator (tests/host/simt.h).

Each CUDA thread runs as a std::thread; barriers, warp shuffles, per-block shared memory
and thread-block clusters (block_rank, cluster sync, map_shared_rank) are emulated, so the
kernels' own indexing, 16-byte packs, group/block/cluster reductions and grid-stride loops
run here, on the launch configuration gpuce._fused computes, and their results are
compared with the float64 reference.
"""

import re

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import reference as R
from gpuce import _fused as F
from gpuce import _kernel_source

HERE = Path(__file__).resolve().parent
DEV = F.Device(arch=80, sms=2, smem_optin=100 * 1024)  # a small grid keeps the emulation quick

V = F.Variant
# (variant, C): every kind the chooser uses (tails, sub-warp groups, shared-memory items,
# clusters of 2 to 8), plus the fallback
CASES = [
    (V("tile", "float32", "int64", 4), 10),  # 37 * 10 elements: a scalar tail after the packs
    (V("tile", "float32", "int32", 1), 7),
    (V("tile", "float16", "prob", 8), 32),
    (V("tile", "float64", "int64", 2), 5),
    (V("warp", "float32", "int64", 4, 1, 4), 12),  # 8 rows per warp, tail rows
    (V("warp", "float32", "int32", 4, 8, 32), 1000),
    (V("warp", "float32", "int64", 1, 2, 32), 50),
    (V("warp", "float32", "prob", 4, 1, 16), 64),
    (V("warp", "float32", "int64", 4, 8, 4), 100),  # 8 rows a warp, several packs a lane
    (V("warp", "float16", "prob", 1, 4, 8), 30),
    (V("warp", "float32", "prob", 4, 8, 32), 1000),
    (V("warp", "float64", "int64", 2, 2, 32), 128),
    (V("warp", "float16", "int64", 8, 4, 32), 1000),
    (V("block", "float32", "int64", 4, 8), 3000),
    (V("block", "float64", "prob", 1, 4), 777),
    (V("block", "float16", "int32", 8, 4, sitems=4), 4096),
    (V("block", "float32", "prob", 4, 8, sitems=8), 4000),
    (V("block", "float32", "int64", 4, 8, sitems=24), 3000),
    (V("twopass", "float32", "int64", 4), 4096),
    (V("twopass", "float64", "int32", 1), 999),
    (V("twopass", "float32", "prob", 4), 300),
    (V("cluster", "float32", "int64", 4, 8, cluster=4), 1000),
    (V("cluster", "float64", "prob", 2, 2, cluster=2, sitems=2), 334),
    # rows longer than the registers of the 64-thread blocks hold: the cp.async packs are used
    (V("cluster", "float64", "prob", 2, 2, cluster=2, sitems=2), 1000),
    (V("cluster", "float16", "int32", 8, 4, cluster=8, sitems=12), 20000),
    (V("cluster", "float32", "prob", 4, 8, cluster=2, sitems=8), 6000),
    # labels loaded a row ahead
    (V("warp", "float32", "int64", 4, 8, 4, ahead=True), 100),
    (V("warp", "float16", "int32", 8, 4, 32, ahead=True), 1000),
    (V("block", "float32", "int64", 4, 8, ahead=True), 3000),
    (V("block", "float32", "int32", 4, 8, sitems=24, ahead=True), 3000),
    (V("cluster", "float32", "int64", 4, 8, cluster=4, ahead=True), 1000),
    (V("cluster", "float16", "int32", 8, 4, cluster=8, sitems=12, ahead=True), 20000),
]


def _wrapper(i, v):
    t, a = F.CT[v.dtype], F.CT[F.ACC[v.dtype]]
    lab = F.CT["int32"] if v.label == "prob" else F.CT[v.label]
    return f'''
extern "C" void run_{i}(unsigned cluster, unsigned grid, unsigned block, size_t shm, const void* x, long long ldx,
                        const void* labels, const void* y, long long ldy, const void* w, long long n, int c,
                        double eps_over_c, double ome, double z, long long ign, const void* scale, void* loss,
                        void* lse, void* grad, long long ldg) {{
    simt_launch(grid, block, shm, [=] {{
        {v.expr()}((const {t}*)x, ldx, (const {lab}*)labels, (const {t}*)y, ldy, (const {a}*)w, n, c,
                   ({a})eps_over_c, ({a})ome, ({a})z, ign, (const {a}*)scale, ({a}*)loss, ({a}*)lse, ({t}*)grad, ldg);
    }}, cluster);
}}'''


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++")
    src = _kernel_source.expand(F.SOURCE)
    src = src.replace("#include <cuda_fp16.h>", "").replace("#include <cooperative_groups.h>", "")
    src = src.replace("extern __shared__ __align__(16) unsigned char smem_raw[];",
                      "unsigned char* smem_raw = simt_dyn_smem();")
    src = re.sub(r"__shared__ (\w+) (\w+)\[([^\]]+)\];", r"\1* \2 = simt_shared<\1>(__COUNTER__, \3);", src)
    assert "__shared__" not in src.replace("__shared__ arrays", "")
    head = ('#include "simt.h"\n#define __CUDA_ARCH__ 900\n#define GPUCE_SIMT\n#define __global__\n#define __device__\n'
            "#define __forceinline__ inline\n#define __align__(n) alignas(n)\n#define __cluster_dims__(...)\n"
            "#define __launch_bounds__(...)\n")
    body = head + src + "".join(_wrapper(i, v) for i, (v, _) in enumerate(CASES))
    d = tmp_path_factory.mktemp("simt")
    (d / "fused_host.cpp").write_text(body)
    so = d / "fused_host.so"
    r = subprocess.run([cxx, "-O1", "-std=c++20", "-shared", "-fPIC", "-pthread", "-w", f"-I{HERE / 'host'}",
                        str(d / "fused_host.cpp"), "-o", str(so)], capture_output=True, text=True)
    if r.returncode:
        pytest.fail("host build of the fused kernels failed:\n" + r.stderr[-4000:])
    return ctypes.CDLL(str(so))


def _inputs(rng, v, n, c):
    dt = np.dtype(v.dtype)
    x = (rng.standard_normal((n, c)) * 3).astype(dt)
    x[1, : min(c, 3)] = np.array([1e4, 1e4 - 1, -1e4])[: min(c, 3)].astype(dt) if dt != np.float16 else 60
    x[2, 0] = -np.inf
    x[3, c // 2] = np.nan
    if v.label == "prob":
        t = rng.random((n, c))
        t[2, 0] = 0.0  # zero mass on the -inf logit
        t = (t / t.sum(1, keepdims=True)).astype(dt)
    else:
        t = rng.integers(0, c, n).astype(np.int32 if v.label == "int32" else np.int64)
        t[2] = 1 % c
        t[::5] = -100
    return x, t


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{v.describe()}-{v.dtype}-{v.label}-C{c}"
                                                         for v, c in CASES])
@pytest.mark.parametrize("options", ["none-weighted-smoothed", "mean-plain"])
def test_fused_kernel_on_host(lib, case, options):
    """"none-weighted-smoothed": weights, label smoothing and z-loss (every coefficient path);
    "mean-plain": no weight (a null pointer), no smoothing, no z-loss -- the common fast path."""
    _run_case(lib, case, options, n=37, one_team=False)


@pytest.mark.parametrize("case", [i for i, (v, _) in enumerate(CASES) if v.kind != "twopass"],
                         ids=[f"{v.describe()}-{v.dtype}-{v.label}-C{c}" for v, c in CASES if v.kind != "twopass"])
def test_fused_grid_stride_loops_on_host(lib, case):
    """One block (one cluster) for 150 rows: every team walks many rows of its grid-stride
    loop, reusing its registers, shared-memory slots and reduction scratch row after row."""
    _run_case(lib, case, "none-weighted-smoothed", n=150, one_team=True)


def _run_case(lib, case, options, n, one_team):
    v, c = CASES[case]
    rng = np.random.default_rng(case)
    x, t = _inputs(rng, v, n, c)
    acc = np.dtype(F.ACC[v.dtype])
    weighted = options.startswith("none")
    w = (rng.random(c) + 0.5).astype(acc) if weighted else np.ones(c, acc)
    eps, z = (0.1, 1e-3) if weighted else (0.0, 0.0)
    kw = dict(weight=w.astype(np.float64) if weighted else None, label_smoothing=eps, z_loss=z,
              reduction="none")
    ref_loss, ref_grad = R.sce(x.astype(np.float64), t if v.label != "prob" else t.astype(np.float64),
                               kind="label" if v.label != "prob" else "prob", **kw)
    if options.startswith("mean"):
        denom = (w[t[t != -100]].astype(np.float64).sum() if v.label != "prob" else n)
        scale = 1.0 / denom
    else:
        scale = 1.0
    loss = np.full(n, -7.0, acc)  # poisoned: every row must be written
    lse = np.full(n, -7.0, acc)
    grad = np.full((n, c), -7.0, x.dtype)
    sc = np.array([scale], acc)
    labels = t if v.label != "prob" else np.zeros(n, np.int32)
    y = t if v.label == "prob" else x[:1]
    p = lambda a: ctypes.c_void_p(a.ctypes.data)  # noqa: E731
    fn = getattr(lib, f"run_{case}")
    fn.restype = None
    grid, block, shm = F.grid_blocks(v, n, c, DEV), F.block_threads(v, c), F.smem_bytes(v, c)
    if one_team:
        grid = max(1, v.cluster)
    fn(ctypes.c_uint(max(1, v.cluster)), ctypes.c_uint(grid), ctypes.c_uint(block), ctypes.c_size_t(shm), p(x),
       ctypes.c_longlong(c), p(labels), p(y), ctypes.c_longlong(c if v.label == "prob" else 0),
       p(w) if weighted else ctypes.c_void_p(None), ctypes.c_longlong(n), ctypes.c_int(c),
       ctypes.c_double(eps / c), ctypes.c_double(1 - eps), ctypes.c_double(z), ctypes.c_longlong(-100), p(sc),
       p(loss), p(lse), p(grad), ctypes.c_longlong(c))
    rtol = {"float16": 3e-3, "float32": 2e-5, "float64": 1e-11}[v.dtype]
    np.testing.assert_allclose(loss, ref_loss, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad * scale, rtol=rtol, atol=rtol * max(scale, 1e-3))
    active = (t != -100) if v.label != "prob" else np.ones(n, bool)
    with np.errstate(invalid="ignore"):
        ref_lse = np.array([R.lse_row(r) for r in x.astype(np.float64)])
    good = np.isfinite(ref_lse) & active
    np.testing.assert_allclose(lse[good], ref_lse[good], rtol=rtol)
    assert np.isnan(lse[~active]).all()  # ignored rows are not read: their lse is NaN
