"""The chunk driver of the linear losses: logits f = X Wᵀ (+ b) a chunk of rows at a time,
never all N x C of them.

Per chunk of rows c:

    f_c = X_c Wᵀ (+ b)     one GEMM into a chunk buffer reused by every chunk, in the
                           accumulation dtype (float32 for float16/bfloat16 X: 16-bit inputs,
                           float32 output, so the row statistics carry no 16-bit rounding)
    row_op(s, e, f_c)      the loss's row operation over rows s:e, in place: it reads the
                           logits and, when gradients are wanted, leaves G_c = ∂L/∂f_c in the
                           buffer (already scaled by the reduction); losses and statistics are
                           its own business
    dX_c = G_c W           one GEMM straight into the rows of dX (when dX is given)
    dW  += G_cᵀ X_c        one GEMM accumulating with beta = 1 (dW holds its start, e.g. λW)
    db  += 1ᵀ G_c          (when db is given)

For 16-bit X, G_c is rounded once (after every scaling) into a second, 16-bit chunk buffer for
the dX and dW GEMMs; db sums the float32 G_c.  Peak extra memory is therefore chunk x C x
(accumulation itemsize + 16-bit itemsize with gradients) on top of the caller's outputs.

linear_cross_entropy is the first loss on this driver; another linear loss (its row operation
reading the same logits) needs only its own ``row_op``.
"""

from __future__ import annotations

from ._backend import free_memory_bytes
from ._blas import gemm
from ._rows import column_sums

# Automatic chunk size: the chunk's logits buffer is kept to AUTO_CHUNK_FRACTION of the
# gradient outputs it serves (dX + dW, the least any implementation must allocate), but at
# least AUTO_CHUNK_MIN_BYTES (so that small problems run in one chunk and every GEMM stays
# large), and at most AUTO_CHUNK_FREE_SHARE of the free device memory.
AUTO_CHUNK_FRACTION = 0.08
AUTO_CHUNK_MIN_BYTES = 64 << 20
AUTO_CHUNK_FREE_SHARE = 0.5
ROW_OVERHEAD_BYTES = 64  # per-row scalars of the kernels' prologue (weights, loss, lse, ...)


def auto_chunk_size(xp, n, c, itemsize, grads_bytes) -> int:
    """Rows a chunk for ``chunk_size=None`` (see the AUTO_CHUNK_* constants); ``itemsize``
    is the chunk buffers' bytes a logit."""
    row = c * itemsize + ROW_OVERHEAD_BYTES
    target = max(AUTO_CHUNK_FRACTION * grads_bytes, AUTO_CHUNK_MIN_BYTES)
    target = min(target, AUTO_CHUNK_FREE_SHARE * free_memory_bytes(xp))  # no bound on NumPy
    return int(max(1, min(n, target // row)))


def chunk_rows(xp, X, c, acc, chunk_size, *, backward, grads_bytes) -> int:
    """Rows a chunk: ``chunk_size`` as given (at most N), else :func:`auto_chunk_size` counting
    the float32 logits buffer and, for 16-bit X with a backward, the 16-bit G buffer."""
    n = X.shape[0]
    g_bytes = X.dtype.itemsize if backward and X.dtype != acc else 0
    rows = chunk_size or auto_chunk_size(xp, n, c, acc.itemsize + g_bytes, grads_bytes)
    return max(1, min(rows, n))


def run_chunks(xp, X, W, bias, acc, rows, row_op, *, dW=None, dX=None, db=None):
    """Walk X's rows in chunks of ``rows``: the logits GEMM, ``row_op(s, e, f)`` in place over
    the chunk buffer ``f`` (rows s:e), then, when ``dW`` is given, the backward GEMMs from the
    G_c that row_op left in ``f`` (see the module docstring).  ``W`` must be C-contiguous (its
    rows are read whole by the GEMMs); X may have any strides (a chunk-sized copy at most)."""
    n = X.shape[0]
    if n == 0:
        return
    c = W.shape[0]
    backward = dW is not None
    half = X.dtype != acc
    buf = xp.empty((rows, c), acc)  # the one chunk buffer: logits, then G
    buf16 = xp.empty((rows, c), X.dtype) if half and backward else None
    for s in range(0, n, rows):
        e = min(n, s + rows)
        m = e - s
        Xc, f = xp.ascontiguousarray(X[s:e]), buf[:m]
        if bias is not None:
            f[...] = bias.astype(acc, copy=False)  # exact for a 16-bit bias
        gemm(xp, "N", "T", Xc, W, f, 1.0, 0.0 if bias is None else 1.0)
        row_op(s, e, f)
        if not backward:
            continue
        g = f
        if half:  # G_c rounded once, after every scaling, for the 16-bit GEMMs
            g = buf16[:m]
            g[...] = f
        gemm(xp, "T", "N", g, Xc, dW, 1.0, 1.0)
        if dX is not None:
            gemm(xp, "N", "N", g, W, dX[s:e], 1.0, 0.0)
        if db is not None:
            db += column_sums(xp, f, acc)
