"""Providers of the softmax cross-entropy benchmark (``gpuce bench``), one callable each
computing the loss and the gradient with respect to the logits of one (N, C) batch:

    gpuce-fused     the single-read RawKernel family (the plan that ran goes into ``note``)
    gpuce-portable  the ElementwiseKernel / ReductionKernel path
    naive-cupy      array-op CuPy (max, exp, sum, divide, index)
    torch-eager     torch.nn.functional.cross_entropy forward + backward, through DLPack
    torch-compile   the same under torch.compile(dynamic=False) (compiled in the warm-up)
    liger           Liger-Kernel's LigerCrossEntropyFunction (when importable)
    gpuce-numpy     the CPU path (``--dry`` and bench/bench_sce_cpu.py)

The harness (gpuce.benchmark) loads this file with :func:`gpuce.benchmark.load_providers`
("ce") and reads the interface every provider file has -- OP, NAMES and
:func:`providers` -- and this op's extras: CPU_NAMES, :func:`describe` (the fused plan and
the kernel-only time of a measured point) and :func:`variant_times` (``--variants``).
bench/probe.py uses :func:`fused_kernel_only`.  Importing it imports neither CuPy nor torch.
"""

from __future__ import annotations

from gpuce.benchmark import gpu_time

OP = "softmax_cross_entropy"
# every provider name a sweep can run (--providers is checked against these; "fused[...]"
# names the pinned fused variants of --variants)
NAMES = ("gpuce-fused", "gpuce-portable", "naive-cupy", "torch-eager", "torch-compile", "liger")
CPU_NAMES = ("gpuce-numpy",)  # providers(numpy)'s names; NAMES then CPU_NAMES: the table's column order


def providers(xp, torch=None, *, softcap=None):
    """name -> fn(x, y) on logits x and int64 labels y of the array module ``xp``.

    ``xp`` NumPy: gpuce's CPU path (CPU_NAMES).  ``xp`` CuPy: gpuce's two GPU paths, naive
    CuPy, and with ``torch`` (the module, given when it sees a CUDA device; None leaves them
    out) torch eager and compiled and Liger where importable.  With ``softcap`` every provider
    caps the logits at softcap * tanh(f / softcap) (gpuce in its kernels, torch eagerly, Liger
    with its option; naive CuPy and torch.compile are left out)."""
    import numpy as np

    if xp is np:
        return _cpu_providers()
    return _gpu_providers(xp, torch, softcap)


def _gpu_providers(cp, torch, softcap):
    import gpuce

    provs = {}

    def fused(x, y):
        return gpuce.softmax_cross_entropy(x, y, return_grad=True, impl="fused", softcap=softcap)

    def portable(x, y):
        return gpuce.softmax_cross_entropy(x, y, return_grad=True, impl="portable", softcap=softcap)

    def naive(x, y):
        xf = x.astype(cp.float32)
        m = xf.max(1, keepdims=True)
        e = cp.exp(xf - m)
        s = e.sum(1, keepdims=True)
        p = e / s
        rows = cp.arange(x.shape[0])
        loss = (cp.log(s[:, 0]) + m[:, 0] - xf[rows, y]).mean()
        p[rows, y] -= 1
        p /= x.shape[0]
        return loss, p.astype(x.dtype)

    provs["gpuce-fused"] = fused
    provs["gpuce-portable"] = portable
    if softcap is None:
        provs["naive-cupy"] = naive
    if torch is not None:
        try:
            if softcap is not None:
                def capped_ce(t, y):
                    return torch.nn.functional.cross_entropy(softcap * torch.tanh(t / softcap), y)

                provs["torch-eager"] = _torch_provider(torch, capped_ce)
                liger = _liger_provider(torch, softcap)
                if liger is not None:
                    provs["liger"] = liger
                return provs
            provs["torch-eager"] = _torch_provider(torch)
            for knob in ("cache_size_limit", "recompile_limit"):  # one compile per shape
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, 256)
            provs["torch-compile"] = _torch_provider(
                torch, torch.compile(torch.nn.functional.cross_entropy, dynamic=False))
            liger = _liger_provider(torch)
            if liger is not None:
                provs["liger"] = liger
        except Exception:
            pass
    return provs


def _cpu_providers():
    import gpuce

    return {"gpuce-numpy": lambda x, y: gpuce.softmax_cross_entropy(x, y, return_grad=True)}


def _torch_provider(torch, ce=None):
    ce = ce or torch.nn.functional.cross_entropy
    state = {}

    def run(x, y):
        key = (x.data.ptr, y.data.ptr, x.shape, x.dtype.str)  # a new array may reuse the pointer
        if state.get("key") != key:
            t = torch.from_dlpack(x)
            state.update(key=key, x=t.detach().clone().requires_grad_(True), y=torch.from_dlpack(y))
        tx = state["x"]
        tx.grad = None
        loss = ce(tx, state["y"])
        loss.backward()
        return loss, tx.grad

    return run


def _liger_provider(torch, softcap=None):
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    except Exception:
        return None
    state = {}

    def run(x, y):
        key = (x.data.ptr, y.data.ptr, x.shape, x.dtype.str)  # a new array may reuse the pointer
        if state.get("key") != key:
            state.update(key=key, x=torch.from_dlpack(x).detach().clone().requires_grad_(True),
                         y=torch.from_dlpack(y))
        tx = state["x"]
        tx.grad = None
        if softcap is None:
            loss = LigerCrossEntropyFunction.apply(tx, state["y"], None)  # weight is positional
        else:  # the keyword API: the Function's positional order changed across Liger releases
            from liger_kernel.transformers.functional import liger_cross_entropy

            loss = liger_cross_entropy(tx, state["y"], softcap=softcap)
        loss = loss[0] if isinstance(loss, tuple) else getattr(loss, "loss", loss)
        loss.backward()
        return loss, tx.grad

    return run


def describe(cp, name, x, y, repeat, softcap=None):
    """(note, extra CSV fields) of a measured provider: for gpuce-fused the variant the planner
    chose and the fused kernels' own time (``kernel_ms``), nothing for the others."""
    if name != "gpuce-fused":
        return "", {}
    from gpuce._cuda import fused

    note = fused.choose(x, "label", y.dtype.name, None, x, softcap=bool(softcap))[0].describe()
    k = gpu_time(cp, fused_kernel_only(cp, x, y), repeat)
    return note, {"kernel_ms": f"{k[1]:.4f}"}


def fused_kernel_only(cp, x, y, reduction="mean", grid=None):
    """A closure relaunching gpuce's fused kernels (the prologue too, for "mean") with the
    arguments of one ``softmax_cross_entropy(x, y, return_grad=True)`` call, prepared once:
    no validation, no allocation, no label read-back."""
    from gpuce._cuda import fused
    from gpuce._validation import acc_dtype

    acc = acc_dtype(x.dtype)
    grad = cp.empty_like(x)
    total = cp.empty((), acc)
    rows = cp.empty(x.shape[0], acc) if reduction == "none" else None
    lbl = cp.ascontiguousarray(y)

    def run():
        return fused.launch(x, lbl, None, None, acc=acc, eps=0.0, z=0.0, softcap=0.0, ignore_index=-100,
                             reduction=reduction, loss_out=rows, lse_out=None, correct_out=None,
                             grad_out=grad, total_out=None if rows is not None else total, stats_out=None,
                             bad_out=None, grid=grid)

    return run


def variant_times(cp, x, y, repeat):
    """Every candidate fused plan but the heuristic's pick, pinned, on the same data:
    name ``fused[<variant>]`` -> (p20/p50/p80 ms or None, None, note)."""
    from gpuce._cuda import fused, sce
    from gpuce._validation import sce_args

    chosen, _, _ = fused.choose(x, "label", y.dtype.name, None, x)
    args = sce_args(x, y, reduction="mean", ignore_index=-100, weight=None, label_smoothing=0.0,
                    z_loss=0.0, return_grad=True, inplace=False)
    grad = cp.empty_like(x)
    out = {}
    for p in fused.candidates_for(x, "label", y.dtype.name, None, grad)[0]:
        if p.variant == chosen.variant:
            continue
        name = f"fused[{p.variant.describe()}]"
        try:
            t = gpu_time(cp, lambda: sce.softmax_cross_entropy(x, y, None, args, grad, "fused", p.variant),
                         repeat)
            out[name] = (t, None, p.describe())
        except Exception as e:
            out[name] = (None, None, f"failed: {type(e).__name__}: {str(e)[:80]}")
        cp.get_default_memory_pool().free_all_blocks()
    return out
