"""The matrix products of the linear model, one call per backend and dtype.

``gemm(xp, transa, transb, A, B, out, alpha, beta)`` computes, in place,

    out = alpha · op(A) @ op(B) + beta · out          (op = identity "N" or transpose "T")

* NumPy: scipy's BLAS gemm writing into ``out`` (float32 / float64); float16 and bfloat16
  (no BLAS has them) are multiplied in float32 from float32 copies of A and B (the operands
  the caller passes: the linear model's row chunks and W, never a whole X) and rounded once
  into ``out`` (to nearest even), or written straight into a float32 ``out``;
* CuPy float32 / float64: ``cupy.cublas.gemm`` (cuBLAS, alpha and beta folded in);
* CuPy float16 / bfloat16: ``cublasGemmEx`` with float16 (CUDA_R_16F) or bfloat16
  (CUDA_R_16BF) storage of A and B and float32 compute (CUBLAS_COMPUTE_32F); ``out`` is
  stored in the inputs' dtype or in float32 (a beta = 1 accumulation in float32, as the
  linear model's bfloat16 dW).

A and B have one dtype; ``out`` has it too, or is float32 when A and B are float16 or
bfloat16.

CuPy's cuBLAS modules load the CUDA libraries when imported: they are imported here,
inside the calls, never at module import (``import gpuce`` works with no GPU).
"""

from __future__ import annotations

import numpy as np

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h), used when the binding does not
# export them by name
_CUDA_R_32F = 0
_CUDA_R_16F = 2
_CUDA_R_16BF = 14
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


def _half_name(dtype):
    """"float16" or "bfloat16" for the 2-byte float dtypes (no BLAS of their own), else None."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return "float16"
    return "bfloat16" if dtype.name == "bfloat16" and dtype.itemsize == 2 else None


def _check_dtypes(A, B, out):
    if A.dtype != B.dtype:
        raise TypeError(f"gemm needs A and B of one dtype, got {A.dtype} and {B.dtype}")
    if out.dtype != A.dtype and not (_half_name(A.dtype) and out.dtype == np.float32):
        raise TypeError(f"gemm: out must have the inputs' dtype {A.dtype} (or float32 for "
                        f"float16/bfloat16 inputs), got {out.dtype}")


def gemm(xp, transa, transb, A, B, out, alpha=1.0, beta=0.0):
    """``out = alpha·op(A)@op(B) + beta·out`` in place; returns out.  A and B of one dtype,
    out of that dtype or, for float16/bfloat16 A and B, float32 (accumulated in float32)."""
    _, _, k = _check(transa, transb, A, B, out)
    _check_dtypes(A, B, out)
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
    half = _half_name(A.dtype)
    if half:
        return _gemm_ex(transa, transb, A, B, out, alpha, beta,
                        _CUDA_R_16F if half == "float16" else _CUDA_R_16BF)
    from cupy import cublas  # lazy: loads cuBLAS

    return cublas.gemm(transa, transb, A, B, out=out, alpha=float(alpha), beta=float(beta))


def _gemm_numpy(transa, transb, A, B, out, alpha, beta):
    if not _half_name(A.dtype):
        return _gemm_scipy(transa, transb, A, B, out, alpha, beta)
    # float16 / bfloat16 (no BLAS): float32 copies of A and B, multiplied by sgemm; into a
    # float32 out directly, otherwise rounded once into out
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    if out.dtype == np.float32:
        return _gemm_scipy(transa, transb, A32, B32, out, alpha, beta)
    prod = out.astype(np.float32) if beta != 0 else np.empty(out.shape, np.float32)
    _gemm_scipy(transa, transb, A32, B32, prod, alpha, beta)
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


def _gemm_ex(transa, transb, A, B, out, alpha, beta, ab_type):
    """cublasGemmEx: A and B stored as ``ab_type`` (CUDA_R_16F or CUDA_R_16BF), out in the
    same type or CUDA_R_32F (float32 out), float32 compute and host scalars."""
    from cupy.cuda import device
    from cupy_backends.cuda.libs import cublas  # lazy: loads cuBLAS

    opf, ops_, m, n, k, first, ldf, second, lds, ldc = rowmajor_as_colmajor(transa, transb, A, B, out)
    one = np.array([alpha, beta], dtype=np.float32)  # host scalars in the compute type
    c_type = _CUDA_R_32F if out.dtype == np.float32 else ab_type
    handle = device.get_cublas_handle()
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        cublas.gemmEx(handle, _OPS[opf], _OPS[ops_], m, n, k, one.ctypes.data,
                      first.data.ptr, ab_type, ldf, second.data.ptr, ab_type, lds,
                      one.ctypes.data + 4, out.data.ptr, c_type, ldc,
                      getattr(cublas, "CUBLAS_COMPUTE_32F", _CUBLAS_COMPUTE_32F),
                      getattr(cublas, "CUBLAS_GEMM_DEFAULT", _CUBLAS_GEMM_DEFAULT))
    finally:
        cublas.setPointerMode(handle, mode)
    return out
