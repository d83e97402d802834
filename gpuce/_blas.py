"""The matrix products of the linear model, one call per backend and dtype.

``gemm(xp, transa, transb, A, B, out, alpha, beta)`` computes, in place,

    out = alpha · op(A) @ op(B) + beta · out          (op = identity "N" or transpose "T")

* NumPy: scipy's BLAS gemm writing into ``out`` (float32 / float64); float16 is multiplied
  in float32 and rounded once;
* CuPy float32 / float64: ``cupy.cublas.gemm`` (cuBLAS, alpha and beta folded in);
* CuPy float16: ``cublasGemmEx`` with float16 storage and float32 compute
  (CUBLAS_COMPUTE_32F), so a beta = 1 accumulation never needs a float32 copy of ``out``.

CuPy's cuBLAS modules load the CUDA libraries when imported: they are imported here,
inside the calls, never at module import (``import gpuce`` works with no GPU).
"""

from __future__ import annotations

import numpy as np

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h), used when the binding does not
# export them by name
_CUDA_R_16F = 2
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1
_OPS = {"N": 0, "T": 1}


def _op(a, trans):
    return a.T if trans == "T" else a


def _check(transa, transb, A, B, out):
    for t in (transa, transb):
        if t not in _OPS:
            raise ValueError(f"trans must be 'N' or 'T', got {t!r}")
    m, k = _op(A, transa).shape
    k2, n = _op(B, transb).shape
    if k != k2 or out.shape != (m, n):
        raise ValueError(f"gemm shapes do not match: op(A) {(m, k)}, op(B) {(k2, n)}, out {out.shape}")
    return m, n, k


def rowmajor_as_colmajor(transa, transb, A, B, out):
    """Arguments of a column-major GEMM that computes ``out = op(A) op(B)`` for C-contiguous
    row-major A, B, out: a row-major (r, c) array is the column-major (c, r) array with leading
    dimension c, so the call computes outᵀ = op(B)ᵀ op(A)ᵀ, B first.

    Returns ``(op_first, op_second, m, n, k, first, ld_first, second, ld_second, ldc)``
    in cuBLAS's order (ops as "N"/"T")."""
    m, n, k = _check(transa, transb, A, B, out)
    return transb, transa, n, m, k, B, B.shape[1], A, A.shape[1], n


def gemm(xp, transa, transb, A, B, out, alpha=1.0, beta=0.0):
    """``out = alpha·op(A)@op(B) + beta·out`` in place; A, B, out of one dtype; returns out."""
    _, _, k = _check(transa, transb, A, B, out)
    if out.size == 0:
        return out
    if k == 0:  # an empty sum: only the beta term
        if beta == 0:
            out.fill(0)
        else:
            out *= out.dtype.type(beta)
        return out
    if xp is np:
        return _gemm_numpy(transa, transb, A, B, out, alpha, beta)
    if not (A.flags.c_contiguous and B.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("gemm on CuPy needs C-contiguous A, B and out")
    if out.dtype == np.float16:
        return _gemm_ex_half(transa, transb, A, B, out, alpha, beta)
    from cupy import cublas  # lazy: loads cuBLAS

    return cublas.gemm(transa, transb, A, B, out=out, alpha=float(alpha), beta=float(beta))


def _gemm_numpy(transa, transb, A, B, out, alpha, beta):
    if out.dtype != np.float16:
        return _gemm_scipy(transa, transb, A, B, out, alpha, beta)
    # float16 (no half-precision BLAS): multiply in float32, round once into out
    prod = _op(A, transa).astype(np.float32) @ _op(B, transb).astype(np.float32)
    prod *= np.float32(alpha)
    if beta != 0:
        prod += np.float32(beta) * out.astype(np.float32)
    out[...] = prod
    return out


def _gemm_scipy(transa, transb, A, B, out, alpha, beta):
    """BLAS through scipy, writing into ``out`` (no temporary of out's size, so a chunked
    dW accumulation on the CPU needs no second C x D array).  Fortran BLAS sees the
    C-contiguous ``out`` as outᵀ, computed as op(B)ᵀ op(A)ᵀ (the same mapping as cuBLAS)."""
    from scipy.linalg.blas import get_blas_funcs

    gemm_f = get_blas_funcs("gemm", dtype=out.dtype)
    A = np.ascontiguousarray(A, dtype=out.dtype)
    B = np.ascontiguousarray(B, dtype=out.dtype)
    res = gemm_f(alpha, B.T, A.T, beta=beta, c=out.T, trans_a=int(transb == "T"),
                 trans_b=int(transa == "T"), overwrite_c=True)
    if not np.shares_memory(res, out):  # f2py made a copy: store the result
        out[...] = res.T
    return out


def _gemm_ex_half(transa, transb, A, B, out, alpha, beta):
    from cupy.cuda import device
    from cupy_backends.cuda.libs import cublas  # lazy: loads cuBLAS

    opf, ops_, m, n, k, first, ldf, second, lds, ldc = rowmajor_as_colmajor(transa, transb, A, B, out)
    one = np.array([alpha, beta], dtype=np.float32)  # host scalars in the compute type
    handle = device.get_cublas_handle()
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    r16 = _CUDA_R_16F
    try:
        cublas.gemmEx(handle, _OPS[opf], _OPS[ops_], m, n, k, one.ctypes.data,
                      first.data.ptr, r16, ldf, second.data.ptr, r16, lds,
                      one.ctypes.data + 4, out.data.ptr, r16, ldc,
                      getattr(cublas, "CUBLAS_COMPUTE_32F", _CUBLAS_COMPUTE_32F),
                      getattr(cublas, "CUBLAS_GEMM_DEFAULT", _CUBLAS_GEMM_DEFAULT))
    finally:
        cublas.setPointerMode(handle, mode)
    return out
