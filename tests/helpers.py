"""Helpers the test modules share: deterministic seeds, torch devices, host copies,
dtype-keyed tolerances and the host build of the fused kernels for the SIMT emulator."""

import zlib

import ml_dtypes
import numpy as np
import pytest


def seed_of(*parts):
    """A deterministic seed from a test's parameters (never hash(): it is salted per process)."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def rng_for(*parts):
    """A NumPy generator seeded from a test's parameters."""
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


def torch_devices(torch):
    """The devices a gpuce.torch test runs on: the CPU, and CUDA (marked gpu) where torch sees it."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return out


def torch_inputs(torch, g, n, c, kind, *, scale, dtype=None, device="cpu", extra=()):
    """Logits (n, c, *extra) = scale * N(0, 1) drawn in float64 and rounded to ``dtype``
    (float64 by default), and targets: int64 labels with about a fifth ignored (-100), or
    probabilities normalised along dim 1 in ``dtype``; both on ``device``, from generator g."""
    dtype = torch.float64 if dtype is None else dtype
    x = (torch.randn((n, c) + extra, generator=g, dtype=torch.float64) * scale).to(dtype)
    if kind == "label":
        t = torch.randint(0, c, (n,) + extra, generator=g)
        t[torch.rand(t.shape, generator=g) < 0.2] = -100
    else:
        t = torch.rand((n, c) + extra, generator=g, dtype=torch.float64)
        t = (t / t.sum(1, keepdim=True)).to(dtype)
    return x.to(device), t.to(device)


def to_numpy(a):
    """Host copy of a NumPy or CuPy array (or scalar)."""
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# dtype-keyed tolerances (relative, absolute) against the float64 reference
TOL = {
    np.dtype(np.float64): (1e-10, 1e-12),
    np.dtype(np.float32): (2e-5, 1e-6),
    np.dtype(np.float16): (2e-3, 2e-3),
    # bfloat16 outputs (gradients, softmax, log_softmax, logsumexp): each element is computed
    # in float32 (relative error ~1e-6) and rounded once to nearest even into 8 significant
    # bits (7 stored + the implicit one), a relative error of at most 2^-8 ~ 3.9e-3 (half an
    # ulp, for a value just above a power of two); rtol 2^-8 is that bound.  atol covers the float32 cancellation in q G - t
    # near zero (~1e-7 of the row's largest term), times the gradient's scale in check().
    BFLOAT16: (2.0**-8, 1e-6),
}
# The loss of bfloat16 logits is never rounded to bfloat16: it is accumulated and returned in
# float32 from inputs that float32 holds exactly, so it meets float32's tolerance.
LOSS_TOL = {**TOL, BFLOAT16: TOL[np.dtype(np.float32)]}


def simt_library(folder, wrappers):
    """The fused kernels' CUDA (gpuce._cuda.fused.SOURCE with its headers pasted) and the C++
    ``wrappers`` (extern "C" launchers) built for the host SIMT emulator (tests/host/simt.h)
    into a shared library in ``folder``, loaded with ctypes; skips without g++."""
    import ctypes
    import re
    import shutil
    import subprocess
    from pathlib import Path

    from gpuce._cuda import fused, source

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++")
    host = Path(__file__).resolve().parent / "host"
    src = source.expand(fused.SOURCE)
    for inc in ("cuda_fp16.h", "cuda_bf16.h", "cooperative_groups.h"):
        src = src.replace(f"#include <{inc}>", "")
    src = src.replace("extern __shared__ __align__(16) unsigned char smem_raw[];",
                      "unsigned char* smem_raw = simt_dyn_smem();")
    src = re.sub(r"__shared__ (\w+) (\w+)\[([^\]]+)\];", r"\1* \2 = simt_shared<\1>(__COUNTER__, \3);", src)
    assert "__shared__" not in src.replace("__shared__ arrays", "")
    head = ('#include "simt.h"\n#define __CUDA_ARCH__ 900\n#define GPUCE_SIMT\n#define __global__\n#define __device__\n'
            "#define __forceinline__ inline\n#define __align__(n) alignas(n)\n#define __cluster_dims__(...)\n"
            "#define __launch_bounds__(...)\n#define __restrict__\n")
    (folder / "fused_host.cpp").write_text(head + src + wrappers)
    so = folder / "fused_host.so"
    r = subprocess.run([cxx, "-O1", "-std=c++20", "-shared", "-fPIC", "-pthread", "-w", f"-I{host}",
                        str(folder / "fused_host.cpp"), "-o", str(so)], capture_output=True, text=True)
    if r.returncode:
        pytest.fail("host build of the fused kernels failed:\n" + r.stderr[-6000:])
    return ctypes.CDLL(str(so))
