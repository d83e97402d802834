"""Which GPU implementation ``impl="auto"`` means, for the calls made in a context.

``gpuce.use_impl("portable")`` is a context manager over a :class:`contextvars.ContextVar`:
each thread and each asyncio task sees its own choice, so setting it in one thread never
changes another's calls.  The dask paths read it when the graph is built and apply it to
their block tasks, wherever those run.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

IMPLS = ("auto", "fused", "portable")
# impl="auto" on CuPy arrays: the fused single-read kernels (gpuce._cuda.fused); "portable" stays
# available as the reference path.
DEFAULT_IMPL = "fused"
_auto = ContextVar("gpuce_auto_impl", default=DEFAULT_IMPL)


def check_impl(impl) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    return impl


def resolve_impl(impl="auto") -> str:
    """The concrete implementation ("fused" or "portable") a call with ``impl`` runs."""
    return _auto.get() if check_impl(impl) == "auto" else impl


def auto_impl() -> str:
    """What ``impl="auto"`` means in the current context."""
    return _auto.get()


@contextlib.contextmanager
def use_impl(impl: str):
    """Within the ``with`` block (this thread or task only), ``impl="auto"`` means ``impl``.

    Parameters
    ----------
    impl : {"fused", "portable"}
        The GPU implementation of softmax cross-entropy: "fused" (the default; one read of
        the logits) or "portable" (ElementwiseKernel / ReductionKernel, two reads).  It also
        picks the rows of token_logprobs and distillation_loss (and their linear forms):
        "fused" launches their fused kernels where those take the call
        (:func:`gpuce._rows.token_route`, :func:`gpuce._rows.distill_route`), "portable" runs
        their array rows.  NumPy arrays always take the NumPy path.

    Examples
    --------
    >>> import gpuce
    >>> with gpuce.use_impl("portable"):
    ...     pass  # CuPy calls here with impl="auto" run the portable kernels
    """
    if impl not in ("fused", "portable"):
        raise ValueError(f"use_impl takes 'fused' or 'portable', got {impl!r}")
    token = _auto.set(impl)
    try:
        yield impl
    finally:
        _auto.reset(token)
