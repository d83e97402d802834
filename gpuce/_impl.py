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
    """The concrete implementation ("fused" or "portable") a call with ``impl`` asks for."""
    return _auto.get() if check_impl(impl) == "auto" else impl


FUSED_MIN_ARCH = 80  # cp.async, bfloat16 arithmetic, max.NaN: what the fused kernels need


def fused_runs_here() -> bool:
    """Whether the current CUDA device can run the fused kernels (compute capability 8.0 or
    later: A100, H100, the RTX 30 series on); one runtime call after the first."""
    from ._cuda.fused import _device, device_id

    return _device(device_id()).arch >= FUSED_MIN_ARCH


def device_impl(impl="auto") -> str:
    """The implementation a call on CuPy arrays runs on the current device: :func:`resolve_impl`,
    except that "fused" runs the portable kernels on a device below compute capability 8.0
    (a V100 or a T4: the fused kernels need cp.async, bfloat16 arithmetic and max.NaN).  The
    results are the same; ``gpuce.explain`` says which ran and why."""
    chosen = resolve_impl(impl)
    if chosen == "fused" and not fused_runs_here():
        return "portable"
    return chosen


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
        their array rows.  NumPy arrays always take the NumPy path.  On a device below
        compute capability 8.0 the fused kernels cannot run, and "fused" runs the portable
        kernels (the token and distillation array rows) instead.

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
