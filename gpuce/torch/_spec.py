"""gpuce.torch's operators, each generated from one :class:`OpSpec`.

A spec names the operator and gives its implementation functions; :func:`define` makes of it

* the custom operator ``gpuce::<name>`` (``torch.library.custom_op``, its schema from the
  implementation's annotated signature), with the spec's fake (meta) function registered and,
  for a forward operator, its autograd formula (``register_autograd``); a backward operator's
  autograd raises the double-backward error instead;
* an eager twin: a ``torch.autograd.Function`` that runs the same implementation, setup and
  backward functions without torch's dispatcher (a custom-op call with its autograd costs
  100-200 microseconds of host time, whatever the input's size);
* :class:`Op`, the callable the public functions and the backward formulas call: it routes
  each call (:meth:`Op.__call__`).

A spec entry looks like::

    CROSS_ENTROPY = define(OpSpec(
        "cross_entropy", impl=_ce_impl, fake=_ce_fake,
        setup_context=_ce_setup_context, backward=_ce_backward))
    CROSS_ENTROPY_BACKWARD = define(OpSpec(
        "cross_entropy_backward", impl=_ce_backward_impl, fake=_ce_backward_fake,
        first_order_of="cross_entropy"))

``impl(*inputs)`` computes the outputs (a tuple of tensors; an empty tensor stands for "not
computed") from tensors and Python scalars, annotated as ``torch.library.custom_op`` wants
them; ``fake(*inputs)`` returns tensors of the outputs' shapes and dtypes (``new_empty`` of the
inputs); ``setup_context(ctx, inputs, output)`` keeps what backward needs (``inputs`` holds
every input, defaults filled); ``backward(ctx, *grads)`` returns the gradients of the leading
inputs, as many as it likes: the generated formula pads them with None for the rest of the
spec's inputs and makes them first-order only (differentiating them again raises).  A new
operator is one spec entry plus these functions; :data:`OPS` lists the entries.

The routing rule (:meth:`Op.__call__`): a call is *eager* when nothing is tracing it — not
compiling (``torch.compiler.is_compiling()``), not ``torch.jit`` tracing or scripting, no
functorch transform (vmap, grad) active, no torch-dispatch mode (FakeTensorMode, make_fx's
proxy mode, user modes) and no torch-function mode other than ``torch.device``'s, every tensor
argument a plain ``torch.Tensor`` or ``nn.Parameter`` (no FakeTensor, FunctionalTensor, DTensor
or other subclass) and every other argument of exactly its annotated type (an int argument
within int64) — and eager calls skip the dispatcher; every other call goes through the custom
operator, which then does what torch does for it (tracing, compiling, argument coercion and
errors).  Both run the same functions on the same values, so the results are the same bits.
An eager call runs the implementation directly where no input requires grad (as the custom
operator's autograd kernel does), else through the eager twin.  ``Op`` takes the inputs
positionally (missing trailing ones get their defaults; more than the spec's go to the custom
operator, which raises).  :func:`through_custom_ops` sends every call through the custom
operators, for tests comparing both paths.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from ._autograd import _NO_DOUBLE_BACKWARD, _first_order_only

NAMESPACE = "gpuce"
DEVICE_TYPES = ("cpu", "cuda")
# {name: Op}: every operator defined, in definition order
OPS: dict = {}

_INT64 = (-(1 << 63), 1 << 63)
# the Python types a non-tensor input of each annotation takes on the eager path; a value of
# another type (a NumPy scalar, an int for a float, a bool for an int) goes through the
# dispatcher, which coerces it or raises as it does for any custom operator
_SCALARS = {int: int, float: float, bool: bool, str: str}


@dataclass(frozen=True, eq=False)
class OpSpec:
    """One operator: its name in the ``gpuce`` namespace and its functions.

    ``impl``'s signature is the operator's: its parameter names, count, annotations and
    defaults are the spec's inputs (:attr:`inputs`, :attr:`defaults`), and ``fake`` must take
    the same parameters.  A forward operator gives ``setup_context`` and ``backward``; a
    backward operator (called from another operator's backward) gives neither and names in
    ``first_order_of`` the public function whose double backward its autograd refuses.
    """

    name: str
    impl: Callable
    fake: Callable
    setup_context: Optional[Callable] = None
    backward: Optional[Callable] = None
    first_order_of: Optional[str] = None
    inputs: tuple = field(init=False)
    defaults: tuple = field(init=False)
    kinds: tuple = field(init=False)

    def __post_init__(self):
        params = list(inspect.signature(self.impl).parameters.values())
        fake_params = list(inspect.signature(self.fake).parameters.values())
        names = tuple(p.name for p in params)
        if tuple(p.name for p in fake_params) != names:
            raise TypeError(f"{self.name}: the fake's parameters "
                            f"{tuple(p.name for p in fake_params)} are not impl's {names}")
        if (self.backward is None) != (self.setup_context is None):
            raise TypeError(f"{self.name}: give both setup_context and backward, or neither")
        if self.backward is None and not self.first_order_of:
            raise TypeError(f"{self.name}: a backward operator names first_order_of")
        first = next((i for i, p in enumerate(params) if p.default is not p.empty), len(params))
        if any(p.default is p.empty for p in params[first:]):
            raise TypeError(f"{self.name}: parameters with defaults must come last")
        hints = typing.get_type_hints(self.impl)
        object.__setattr__(self, "inputs", names)
        object.__setattr__(self, "defaults", tuple(p.default for p in params[first:]))
        object.__setattr__(self, "kinds", tuple(_kind(hints[n], self.name, n) for n in names))

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def required(self) -> int:
        """The number of inputs without a default."""
        return len(self.inputs) - len(self.defaults)


def _kind(hint, op, name):
    """(type, optional) of an input's annotation: type is Tensor or one of _SCALARS."""
    optional = False
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{op}: input {name} has an unsupported annotation {hint}")
        hint, optional = args[0], True
    if hint is not Tensor and hint not in _SCALARS:
        raise TypeError(f"{op}: input {name} has an unsupported annotation {hint}")
    return hint, optional


# ---------------------------------------------------------------------------------------------
# the routing rule
# ---------------------------------------------------------------------------------------------

_PLAIN = (Tensor, torch.nn.Parameter)
_through_custom_ops = False


@contextlib.contextmanager
def through_custom_ops():
    """While active, every call goes through the custom operators (the path a compiled or
    traced call takes): for comparing both paths in tests.  Not thread-local."""
    global _through_custom_ops
    before = _through_custom_ops
    _through_custom_ops = True
    try:
        yield
    finally:
        _through_custom_ops = before


def _device_context_type():
    try:
        from torch.utils._device import DeviceContext
    except ImportError:  # pragma: no cover - a torch without it: every function mode counts
        return None
    return DeviceContext


_DEVICE_CONTEXT = _device_context_type()


def _function_modes_only_devices():
    """Whether every torch-function mode active is a ``torch.device`` context (which only
    fills in factory functions' device= and sees the custom operator's call pass by)."""
    n = torch._C._len_torch_function_stack()
    if n == 0:
        return True
    if _DEVICE_CONTEXT is None:
        return False
    return all(isinstance(torch._C._get_function_stack_at(i), _DEVICE_CONTEXT) for i in range(n))


def _nothing_tracing():
    """No compiler, tracer, functorch transform or torch mode is watching this call (the
    introspection torch offers for it; where a query is missing, a call counts as traced)."""
    try:
        return not (_through_custom_ops or torch.compiler.is_compiling()
                    or torch.jit.is_tracing() or torch.jit.is_scripting()
                    or torch._C._are_functorch_transforms_active()
                    or torch._C._len_torch_dispatch_stack()
                    or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
                    or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None
                    or not _function_modes_only_devices())
    except AttributeError:  # pragma: no cover - another torch: the custom operator
        return False


def _plain_arguments(kinds, args):
    """Every argument is of exactly its annotated type (tensors plain, ints within int64)."""
    for (kind, optional), a in zip(kinds, args):
        if a is None:
            if not optional:
                return False
        elif kind is Tensor:
            if type(a) not in _PLAIN:
                return False
        elif type(a) is not kind:
            return False
        elif kind is int and not _INT64[0] <= a < _INT64[1]:
            return False
    return True


def is_eager(spec: OpSpec, args) -> bool:
    """Whether a call of ``spec``'s operator with ``args`` (every input, positionally) takes
    the eager path: nothing traces it and its arguments are plain (see the module docstring)."""
    return _nothing_tracing() and _plain_arguments(spec.kinds, args)


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------

def _double_backward_refused(name):
    def backward(ctx, *grads):
        raise RuntimeError(_NO_DOUBLE_BACKWARD.format(name=name))
    return backward


def _padded(spec, name, backward):
    """``backward`` as an autograd formula of all of spec's inputs: its gradients (for the
    leading inputs) first-order only, None for the rest."""
    n = len(spec.inputs)

    def formula(ctx, *grads):
        got = backward(ctx, *grads)
        if len(got) > n:
            raise AssertionError(f"{spec.name}: {len(got)} gradients for {n} inputs")
        return _first_order_only(name, tuple(got)) + (None,) * (n - len(got))
    return formula


def _eager_function(spec, setup_context, backward):
    """The eager twin: a torch.autograd.Function running spec's functions.  Its forward takes
    ctx and calls setup_context itself (a Function with a separate setup_context staticmethod
    binds its arguments with inspect.signature on every call: tens of microseconds)."""
    impl = spec.impl

    def forward(ctx, *args):
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    cls_name = "".join(p.capitalize() for p in spec.name.split("_")) + "Eager"
    return type(cls_name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward),
                 "__doc__": f"{spec.qualname}'s eager twin (no dispatcher)."})


class Op:
    """A defined operator: ``Op(*args)`` routes the call (eager twin or custom operator);
    ``custom`` is the ``torch.library`` custom operator, ``overload`` its OpOverload
    (``torch.ops.gpuce.<name>.default``), ``eager`` the autograd.Function."""

    def __init__(self, spec: OpSpec):
        self.spec = spec
        name = spec.first_order_of or spec.name
        if spec.backward is not None:
            setup_context = spec.setup_context
            backward = _padded(spec, name, spec.backward)
        else:
            setup_context = _no_context
            backward = _double_backward_refused(name)
        custom = torch.library.custom_op(spec.qualname, mutates_args=(),
                                         device_types=DEVICE_TYPES)(spec.impl)
        custom.register_fake(spec.fake)
        custom.register_autograd(backward, setup_context=setup_context)
        self.custom = custom
        self.overload = getattr(getattr(torch.ops, NAMESPACE), spec.name).default
        self.eager = _eager_function(spec, setup_context, backward)
        self._n = len(spec.inputs)

    def __repr__(self):
        return f"<gpuce.torch operator {self.spec.qualname}>"

    def __call__(self, *args):
        spec = self.spec
        if len(args) > self._n:  # torch's error for it
            return self.custom(*args)
        if len(args) < self._n:
            if len(args) < spec.required:
                raise TypeError(f"{spec.qualname} takes at least {spec.required} arguments, "
                                f"got {len(args)}")
            args = args + spec.defaults[len(args) - spec.required:]
        if not is_eager(spec, args):
            return self.custom(*args)
        if torch.is_grad_enabled() and any(type(a) in _PLAIN and a.requires_grad for a in args):
            return self.eager.apply(*args)
        return spec.impl(*args)


def _no_context(ctx, inputs, output):
    """A backward operator keeps nothing: its autograd only refuses."""


def define(spec: OpSpec) -> Op:
    """The operator of ``spec`` (registered with torch, listed in :data:`OPS`)."""
    if spec.name in OPS:
        raise ValueError(f"{spec.qualname} is defined already")
    op = Op(spec)
    OPS[spec.name] = op
    return op
