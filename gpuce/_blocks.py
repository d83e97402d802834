"""Row blocks of an array's leading dimensions: the chunk walker's index arithmetic.

An array of shape ``lead + (C,)`` is a stack of ``N = prod(lead)`` rows.  When its leading
dimensions cannot be merged into one (no (N, C) view exists without a copy, e.g. a
``(T, B, C)`` array transposed to ``(B, T, C)``), the row-wise functions walk it in blocks
of consecutive rows, each block a basic-indexing view ``arr[index]``, so that at most one
block is ever copied.  Plain index arithmetic, shared by NumPy and CuPy.
"""

from __future__ import annotations

import math


def rows_viewable(shape, strides) -> bool:
    """True if the leading dimensions of ``shape`` (all but the last) merge into one row
    axis with a single stride, i.e. ``reshape(N, C)`` is a view.  Unit dimensions are free."""
    if len(shape) <= 2:  # one leading dimension (or none) is its own row axis
        return True
    dims = [(n, s) for n, s in zip(shape[:-1], strides[:-1]) if n != 1]
    if any(n == 0 for n, _ in dims):
        return True
    return all(s_outer == s_inner * n_inner
               for (_, s_outer), (n_inner, s_inner) in zip(dims, dims[1:]))


def row_blocks(lead, max_rows: int):
    """Blocks of at most ``max(max_rows, 1)`` consecutive rows of the row-major flattening of
    ``lead`` (fewer when a block must not cross a leading index).

    Yields ``(index, r0, r1)``: ``arr[index]`` (``index`` a tuple of ints and one slice) holds
    rows ``r0 .. r1 - 1`` of ``arr``'s ``(N, C)`` flattening in order, with shape
    ``(k, *lead[j + 1:], C)`` for the dimension j the block is cut along.
    """
    lead = tuple(int(d) for d in lead)
    if not lead:
        yield (), 0, 1
        return
    if math.prod(lead) == 0:
        return
    max_rows = max(1, int(max_rows))
    inner = [math.prod(lead[j + 1:]) for j in range(len(lead))]
    j = next(j for j in range(len(lead)) if inner[j] <= max_rows)  # inner[-1] == 1
    step = max(1, max_rows // inner[j])
    span = lead[j] * inner[j]  # rows under one index prefix
    for p, prefix in enumerate(_ndindex(lead[:j])):
        base = p * span
        for a in range(0, lead[j], step):
            b = min(lead[j], a + step)
            yield prefix + (slice(a, b),), base + a * inner[j], base + b * inner[j]


def _ndindex(shape):
    """Row-major index tuples of ``shape`` (a single empty tuple for ``()``)."""
    if not shape:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _ndindex(shape[1:]):
            yield (i,) + rest
