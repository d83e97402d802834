"""CuPy kernel definitions (the portable GPU path) and their memoized factories.

Each kernel is described once, as a :class:`KernelSpec` (plain data, no CuPy
import), and built lazily on first use by :func:`get_kernel`.  The same specs
feed the offline NVRTC compile check (:mod:`gpuce._cuda.nvrtc`), so every kernel the
library can launch is compiled in CI without a GPU.

Kernels (A = accumulation type: float32 for float16/float32 logits, float64 for
float64 logits):

``gpuce_lse``
    ReductionKernel, one pass: per-row online max / sum-exp, writes the normaliser as
    (mx, ls) with lse = mx + ls.
``gpuce_softmax`` / ``gpuce_log_softmax``
    ElementwiseKernel: ``exp((x - mx) - ls)`` / ``(x - mx) - ls``, the row pair broadcast.
``gpuce_sce_stats_label`` / ``gpuce_sce_stats_prob``
    ReductionKernel, one read of the logits (and targets): per-row (mx, ls), the
    label term ``lse - x_k``, the smoothing / soft-target term
    ``sum_c coef_c (lse - x_c)`` and ``sum_c coef_c``.
``gpuce_sce_rows``
    ElementwiseKernel over rows: per-sample loss and gradient coefficient.
``gpuce_sce_grad_label`` / ``gpuce_sce_grad_prob``
    ElementwiseKernel, second read of the logits, one write: the gradient.
``gpuce_sumsq``
    ReductionKernel: ``sum x**2`` in the accumulation type (the L2 regulariser).
``gpuce_finite_rows``
    ReductionKernel: a bool a row, whether all its values are finite (the linear model's
    check_finite: a byte a row, never a byte an element).
``gpuce_label_check``
    ElementwiseKernel: position of the first out-of-range label (atomicMin on
    an int64, order-independent), read back with one sync.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from . import source

# dtype name -> short tag used in kernel names
_TAG = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64", "int32": "i32", "int64": "i64"}
ACC_OF = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}
FLOATS = ("float16", "bfloat16", "float32", "float64")
INTS = ("int32", "int64")


@dataclass(frozen=True)
class KernelSpec:
    """One CuPy kernel: its parameters, CUDA snippets and the helper files it needs.

    ``kind`` is ``"elementwise"`` or ``"reduction"``.  Type placeholders (single
    capital letters) are bound by the dtypes of the arrays passed at launch;
    ``specializations`` lists the bindings gpuce launches, each becoming one
    named kernel object (``<name>_<tags>``).
    """

    name: str
    kind: str
    in_params: str
    out_params: str
    operation: str = ""  # elementwise body
    map_expr: str = ""  # reduction
    reduce_expr: str = ""
    post_map_expr: str = ""
    identity: str = ""
    reduce_type: str = ""
    helpers: tuple = ("gpuce_rowstat.cuh",)
    specializations: tuple = field(default_factory=tuple)  # tuple of dicts placeholder -> dtype name

    def kernel_name(self, types: dict) -> str:
        order = sorted(types, key=lambda k: ("TYIOA".index(k) if k in "TYIOA" else 9, k))
        return "_".join([self.name] + [_TAG[types[k]] for k in order])

    def substitute(self, text: str, types: dict) -> str:
        """Replace ``{A}``-style markers by concrete C types (used for reduce types)."""
        return text.format(**{k: CTYPE[v] for k, v in types.items()})


CTYPE = {
    "float16": "float16",
    "bfloat16": "bfloat16",
    "float32": "float",
    "float64": "double",
    "int32": "int",
    "int64": "long long",
    "bool": "bool",
}


def _float_specs():
    return tuple({"T": t, "A": ACC_OF[t]} for t in FLOATS)


def _label_specs():
    return tuple({"T": t, "A": ACC_OF[t], "I": i} for t in FLOATS for i in INTS)


def _prob_specs():  # targets of the logits' dtype, or read in float32 / float64 (mixed dtypes)
    return tuple({"T": t, "A": ACC_OF[t], "Y": y} for t in FLOATS for y in sorted({t, ACC_OF[t]}))


SPECS = {
    s.name: s
    for s in [
        KernelSpec(
            name="gpuce_lse",
            kind="reduction",
            in_params="T x",
            out_params="A mx, A ls",
            map_expr="gpuce::LseStat<A>::element(A(x))",
            reduce_expr="gpuce::merge(a, b)",
            post_map_expr="gpuce::finish_lse(a, mx, ls)",
            identity="_type_reduce::identity()",
            reduce_type="gpuce::LseStat<{A}>",
            specializations=_float_specs(),
        ),
        KernelSpec(
            name="gpuce_softmax",
            kind="elementwise",
            in_params="T x, A mx, A ls",
            out_params="T y",
            operation="y = isfinite(mx + ls) ? T(exp((A(x) - mx) - ls)) : T(gpuce::quiet_nan<A>())",
            specializations=_float_specs(),
        ),
        KernelSpec(
            name="gpuce_log_softmax",
            kind="elementwise",
            in_params="T x, A mx, A ls",
            out_params="T y",
            operation="y = isfinite(mx + ls) ? T((A(x) - mx) - ls) : T(gpuce::quiet_nan<A>())",
            specializations=_float_specs(),
        ),
        KernelSpec(
            name="gpuce_sce_stats_label",
            kind="reduction",
            in_params="T x, I lbl, int32 col, A w, A eps_over_c, I ign, A cap",
            out_params="A mx, A ls, A tlab, A smooth, A asum, A hit",
            map_expr=(
                "gpuce::RowStat<A>::element(gpuce::softcap_value(A(x), cap), "
                "gpuce::label_coef(lbl != ign, w, eps_over_c), lbl == I(col))"
            ),
            reduce_expr="gpuce::merge(a, b)",
            post_map_expr="gpuce::finish_reduction(a, mx, ls, tlab, smooth, asum, hit)",
            identity="_type_reduce::identity()",
            reduce_type="gpuce::RowStat<{A}>",
            specializations=_label_specs(),
        ),
        KernelSpec(
            name="gpuce_sce_stats_prob",
            kind="reduction",
            in_params="T x, Y y, A w, A one_minus_eps, A eps_over_c, A cap",
            out_params="A mx, A ls, A tlab, A smooth, A asum, A hit",
            map_expr=(
                "gpuce::RowStat<A>::element(gpuce::softcap_value(A(x), cap), "
                "gpuce::prob_coef(A(y), w, one_minus_eps, eps_over_c), false)"
            ),
            reduce_expr="gpuce::merge(a, b)",
            post_map_expr="gpuce::finish_reduction(a, mx, ls, tlab, smooth, asum, hit)",
            identity="_type_reduce::identity()",
            reduce_type="gpuce::RowStat<{A}>",
            specializations=_prob_specs(),
        ),
        KernelSpec(
            name="gpuce_sce_rows",
            kind="elementwise",
            in_params="bool active, A mx, A ls, A tlab, A smooth, A asum, A wl, A z",
            out_params="A loss, A g",
            operation="gpuce::finish_loss(active, mx, ls, tlab, smooth, asum, wl, z, loss, g)",
            specializations=({"A": "float32"}, {"A": "float64"}),
        ),
        KernelSpec(
            name="gpuce_sce_grad_label",
            kind="elementwise",
            in_params="T x, A mx, A ls, A g, A wl, I lbl, int32 col, A w, A eps_over_c, A scale, I ign, A cap",
            out_params="T grad",
            operation=(
                "bool act = lbl != ign;\n"
                "grad = T(gpuce::grad_element(act, A(x), mx, ls, g, gpuce::label_coef(act, w, eps_over_c), "
                "wl, lbl == I(col), scale, cap))"
            ),
            specializations=_label_specs(),
        ),
        KernelSpec(
            name="gpuce_sce_grad_prob",
            kind="elementwise",
            in_params="T x, Y y, A mx, A ls, A g, A w, A one_minus_eps, A eps_over_c, A scale, A cap",
            out_params="T grad",
            operation=(
                "grad = T(gpuce::grad_element(true, A(x), mx, ls, g, "
                "gpuce::prob_coef(A(y), w, one_minus_eps, eps_over_c), A(0), false, scale, cap))"
            ),
            specializations=_prob_specs(),
        ),
        KernelSpec(
            name="gpuce_sumsq",
            kind="reduction",
            in_params="T x",
            out_params="A y",
            map_expr="({A})x * ({A})x",
            reduce_expr="a + b",
            post_map_expr="y = a",
            identity="0",
            reduce_type="{A}",
            helpers=(),
            specializations=_float_specs(),
        ),
        KernelSpec(
            name="gpuce_finite_rows",
            kind="reduction",
            in_params="T x",
            out_params="bool y",
            map_expr="isfinite(({A})x)",
            reduce_expr="a && b",
            post_map_expr="y = a",
            identity="true",
            reduce_type="bool",
            helpers=(),
            specializations=_float_specs(),
        ),
        KernelSpec(
            name="gpuce_label_check",
            kind="elementwise",
            in_params="I t, int64 ncls, I ign",
            out_params="raw int64 first",
            operation="if (t != ign && (t < 0 || t >= ncls)) atomicMin(&first[0], (long long)i)",
            helpers=(),
            specializations=tuple({"I": i} for i in INTS),
        ),
    ]
}


def _tags_for(spec: KernelSpec, dtypes: dict) -> dict:
    types = {k: str(v) for k, v in dtypes.items()}
    if types not in [dict(s) for s in spec.specializations]:
        raise KeyError(f"{spec.name} has no specialization for {types}")
    return types


@functools.lru_cache(maxsize=None)
def _build(name: str, frozen_types: tuple):
    import cupy  # lazy: gpuce imports without CuPy

    spec = SPECS[name]
    types = dict(frozen_types)
    kname = spec.kernel_name(types)
    preamble = source.preamble(*spec.helpers)
    if spec.kind == "elementwise":
        return cupy.ElementwiseKernel(
            spec.in_params, spec.out_params, spec.operation, kname, preamble=preamble
        )
    return cupy.ReductionKernel(
        spec.in_params,
        spec.out_params,
        spec.substitute(spec.map_expr, types),
        spec.reduce_expr,
        spec.post_map_expr,
        spec.identity,
        kname,
        reduce_type=spec.substitute(spec.reduce_type, types),
        preamble=preamble,
    )


def get_kernel(name: str, **dtypes):
    """The CuPy kernel object for spec ``name`` specialised to ``dtypes``.

    Built on first call and memoized; CuPy itself compiles (and caches on disk)
    the binary once per device and argument dtypes.
    """
    types = _tags_for(SPECS[name], dtypes)
    return _build(name, tuple(sorted(types.items())))
