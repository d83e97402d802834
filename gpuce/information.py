"""Information measures of probability vectors: H(P), H(P,Q), KL(P||Q).

Plain array code shared by NumPy and CuPy (no custom kernel is needed: each is
one elementwise map and one sum).  Conventions follow scipy.special's
``entr`` / ``rel_entr``: ``0 log 0 = 0``, ``p log(p/0) = +inf`` for ``p > 0``, and a NaN
in p or q makes its term (so its row) NaN.
Results are float64 for float64 inputs and float32 otherwise (float16 and bfloat16 are
computed in float32; p and q may have different float dtypes), with ``axis`` removed,
so that ``cross_entropy(p, q) == entropy(p) + kl_div(p, q)`` up to rounding.
"""

from __future__ import annotations

import numpy as np

from ._backend import array_module, asarray
from ._dask import map_rows
from ._dispatch import backends
from ._validation import acc_dtype, check_axis, check_float, check_same_shape


def _prep(*arrays, axis):
    xp = array_module(*arrays)
    arrays = [asarray(xp, a) for a in arrays]
    for name, a in zip("pq", arrays):
        check_float(a, name)
    if len(arrays) == 2:
        check_same_shape(*arrays)
    axis = check_axis(axis, arrays[0].ndim)
    # float64 if any input is float64, else float32 (bfloat16 and float16 have no common
    # NumPy type: each is read in float32, exactly)
    acc = max((acc_dtype(a.dtype) for a in arrays), key=lambda d: d.itemsize)
    return xp, [a.astype(acc, copy=False) for a in arrays], axis


@backends("p", dask=map_rows(keep_axis=False))
def entropy(p, axis=-1):
    """Entropy ``H(P) = -sum_x p(x) log p(x)`` per row, with ``0 log 0 = 0``.

    Terms are those of ``scipy.special.entr``: ``-p log p`` for p > 0, 0 for p = 0, -inf
    for p < 0 and NaN for a NaN p.

    See Also
    --------
    scipy.stats.entropy, scipy.special.entr
    """
    xp, (p,), axis = _prep(p, axis=axis)
    pos = p > 0
    zero, inf = p.dtype.type(0), p.dtype.type(np.inf)  # typed: keep the result in p's dtype
    terms = xp.where(pos, -p * xp.log(xp.where(pos, p, 1)), xp.where(p == 0, zero, -inf))
    terms = xp.where(xp.isnan(p), xp.nan, terms)
    return terms.sum(axis=axis)


@backends("p", "q", dask=map_rows(keep_axis=False))
def cross_entropy(p, q, axis=-1):
    """Cross-entropy ``H(P,Q) = -sum_x p(x) log q(x)`` per row.

    Terms with ``p = 0`` are 0 (whatever finite q); a term with ``q = 0 < p`` is +inf; a NaN
    in p or q gives a NaN term, as in ``entr(p) + rel_entr(p, q)``.

    See Also
    --------
    softmax_cross_entropy : the same quantity from logits, with a fused gradient.
    """
    xp, (p, q), axis = _prep(p, q, axis=axis)
    zero_p = p == 0
    with np.errstate(divide="ignore"):  # log(0) -> -inf is the intended +inf term
        logq = xp.log(xp.where(zero_p, 1, q))
    terms = xp.where(zero_p, 0, -p * logq)
    terms = xp.where(xp.isnan(p) | xp.isnan(q), xp.nan, terms)
    return terms.sum(axis=axis)


@backends("p", "q", dask=map_rows(keep_axis=False))
def kl_div(p, q, axis=-1):
    """Kullback-Leibler divergence ``KL(P||Q) = sum_x p(x) log(p(x)/q(x))`` per row.

    The same as ``scipy.special.rel_entr(p, q).sum(axis)``: terms are
    ``p log(p/q)`` for p, q > 0, 0 for p = 0 <= q, NaN where p or q is NaN, and +inf
    otherwise.

    See Also
    --------
    scipy.special.rel_entr, torch.nn.functional.kl_div (which takes log q)
    """
    xp, (p, q), axis = _prep(p, q, axis=axis)
    both = (p > 0) & (q > 0)
    ps = xp.where(both, p, 1)
    qs = xp.where(both, q, 1)
    terms = xp.where(both, p * (xp.log(ps) - xp.log(qs)),
                     xp.where((p == 0) & (q >= 0), p.dtype.type(0), p.dtype.type(np.inf)))
    terms = xp.where(xp.isnan(p) | xp.isnan(q), xp.nan, terms)
    return terms.sum(axis=axis)
