"""The one place where a public function's backend is decided, by one mechanism.

Every public array function of gpuce (softmax, log_softmax, logsumexp, entropy,
cross_entropy, kl_div, softmax_cross_entropy, linear_cross_entropy) is wrapped by
:func:`backends`, naming the parameters that may hold arrays and the function's dask form:

* a dask array in one of those parameters: the call goes to the dask form
  (:mod:`gpuce._dask`), handed the in-memory function to run on each row block;
* otherwise the in-memory function runs, and its first step,
  :func:`gpuce._backend.array_module`, picks NumPy or CuPy from the array types (CuPy
  recognised without importing it; NumPy mixed with CuPy is a TypeError naming both).

``fn.in_memory`` is the undecorated function.  The dask forms take ``(in_memory,
arguments)``, ``arguments`` being the call's bound arguments with defaults applied.

Callers that take array-likes beyond one function's parameters (SoftmaxClassifier's fit,
predict, predict_proba, decision_function, score, objective) ask :func:`backend_of` instead,
once per call, and send the dask case to their dask form in :mod:`gpuce._dask`.
"""

from __future__ import annotations

import functools
import inspect

from ._backend import is_cupy_array, is_dask_array

# the backends backend_of names
DASK, CUPY, HOST = "dask", "cupy", "host"


def backend_of(*arrays) -> str:
    """The backend a call with these inputs runs on: ``"dask"`` when one is a dask array,
    else ``"cupy"`` when one is a CuPy array, else ``"host"`` (NumPy arrays, lists, pandas,
    scipy.sparse; ``None`` entries count as host).  The same test as :func:`backends`; a mix
    of NumPy and CuPy is left to :func:`gpuce._backend.array_module` to refuse."""
    if any(is_dask_array(a) for a in arrays):
        return DASK
    if any(is_cupy_array(a) for a in arrays):
        return CUPY
    return HOST


def backends(*array_params: str, dask):
    """Decorator: send calls with a dask array in one of ``array_params`` to
    ``dask(in_memory_fn, arguments)``; run every other call as written."""

    def deco(fn):
        sig = inspect.signature(fn)
        names = list(sig.parameters)
        where = [(names.index(p), p) for p in array_params]  # position or keyword of each

        @functools.wraps(fn)
        def public(*args, **kwargs):
            for pos, name in where:  # cheap: no binding unless a dask array is passed
                v = args[pos] if pos < len(args) else kwargs.get(name)
                if is_dask_array(v):
                    bound = sig.bind(*args, **kwargs)
                    bound.apply_defaults()
                    return dask(fn, dict(bound.arguments))
            return fn(*args, **kwargs)

        public.in_memory = fn
        # found by name (module.function.in_memory), so pickle sends the in-memory function
        # to dask workers by reference, like any module-level function
        fn.__qualname__ = f"{public.__qualname__}.in_memory"
        return public

    return deco
