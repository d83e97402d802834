"""The CuPy host path of softmax_cross_entropy without a GPU: what it launches and with which
arguments.

The device-side calls are stubbed by bench/host_stub.py (fake device memory; allocation,
device, stream and occupancy queries, and kernels that record their launches).  Any other
CuPy operation would need the device and fail here, so these tests also prove that the
default fused call launches nothing but the prologue and the fused kernel (at most
two launches, nothing else on the stream), and that a call whose launch recipe is remembered
(gpuce._cuda.fused.recipe) passes its own arrays, never a previous call's.
"""

import threading

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

import gpuce  # noqa: E402
from gpuce._backend import cupy_available  # noqa: E402
from gpuce._cuda import fused as F  # noqa: E402
from bench.host_stub import H100_LIKE, StubHost, install  # noqa: E402
from tests.test_fused_planner import _source_params  # noqa: E402

H100 = F.Device(**H100_LIKE)

# With a GPU the real path is tested (tests/test_fused_gpu.py etc.), and a stray CuPy operation
# here would run on the fake addresses and could poison the device for the tests after it.
pytestmark = pytest.mark.skipif(cupy_available(), reason="the device stubs are for machines without a GPU")


@pytest.fixture
def host(monkeypatch):
    h = StubHost()
    install(h, monkeypatch.setattr)
    monkeypatch.setattr(F, "by_value", lambda v: v)  # keep the scalars readable
    return h


def _named(args, kind):
    params = _source_params(kind)
    assert len(args) == len(params)
    return dict(zip([name for name, _ in params], args))


def _same(a, b):
    """The same device buffer and shape (the result may be another view of the output)."""
    return a.data.ptr == b.data.ptr and a.size == b.size


def _inputs(host, n, c, dtype=np.float32, index=np.int64):
    return host.array((n, c), dtype), host.array((n,), index)


def test_default_call_is_two_launches_with_its_own_arrays(host):
    x, y = _inputs(host, 4096, 1000)
    loss, grad = gpuce.softmax_cross_entropy(x, y, return_grad=True, check_labels=False)
    ws = F._WORKSPACES.by_stream[(0, 0)][0]
    # the gradient, the workspace (the first call on this stream only) and the 0-d loss:
    # nothing else
    assert [a.shape for a in host.allocations] == [(4096, 1000), ws.shape, ()]
    assert len(host.launches) == 2
    (pro_expr, pro_grid, pro_block, pro_args, _), (expr, grid, block, args, smem) = host.launches
    assert pro_expr == F.prologue_expr("int64", "float32")
    pro = _named(pro_args, "sce_prologue")
    assert pro["labels"] is y and pro["w"] is None and pro["ws"] is ws
    assert (pro["n"], pro["c"], pro["ignore_index"], pro["denominator"]) == (4096, 1000, -100, 1)
    plan = F.plan("float32", "label", "int64", 1000, 4, H100)
    assert expr == plan.variant.expr() and block == (plan.threads,) and smem == plan.smem
    assert grid == (F.grid_blocks(plan, 4096, H100, 2),)
    a = _named(args, plan.variant.kind)
    assert a["x"] is x and a["labels"] is y and a["ws"] is ws
    assert _same(a["grad"], grad) and _same(a["total_out"], loss)
    assert a["loss_out"] is None and a["lse_out"] is None and a["bad_out"] is None
    assert (a["n"], a["c"], a["ldx"], a["ldg"], a["inv_from_ws"]) == (4096, 1000, 1000, 1000, 1)
    assert (a["P"], a["S"]) == (plan.packs, plan.stages)


def test_a_remembered_recipe_takes_the_new_call_arrays(host):
    x1, y1 = _inputs(host, 512, 4096)
    x2, y2 = _inputs(host, 512, 4096)
    out1 = gpuce.softmax_cross_entropy(x1, y1, return_grad=True, reduction="sum", check_labels=False)
    assert len(F._RECIPES) == 1
    out2 = gpuce.softmax_cross_entropy(x2, y2, return_grad=True, reduction="sum", check_labels=False)
    assert len(F._RECIPES) == 1  # the same signature: the recipe is reused
    assert len(host.launches) == 2  # "sum" needs no prologue: one launch a call
    for (loss, grad), (x, y), (_, _, _, args, _) in zip((out1, out2), ((x1, y1), (x2, y2)), host.launches):
        a = _named(args, "block")
        assert a["x"] is x and a["labels"] is y and _same(a["grad"], grad) and _same(a["total_out"], loss)
    assert host.launches[0][3][0] is not host.launches[1][3][0]


def test_a_new_signature_gets_its_own_recipe(host):
    """Another row length, label dtype, reduction, or base address modulo 16 bytes is another
    signature; its plan and scalars are its own."""
    x, y = _inputs(host, 256, 1000)
    gpuce.softmax_cross_entropy(x, y, reduction="sum", check_labels=False)
    x10, y10 = _inputs(host, 4096, 10, index=np.int32)
    gpuce.softmax_cross_entropy(x10, y10, reduction="none", check_labels=False)
    xs = x[:, 1:]  # rows 4 bytes off their granules, the new gradient's not: one value a pack
    gpuce.softmax_cross_entropy(xs, y, reduction="sum", return_grad=True, check_labels=False)
    assert len(F._RECIPES) == 3
    kinds = [e for e, *_ in host.launches]
    assert kinds[0] == F.plan("float32", "label", "int64", 1000, 4, H100).variant.expr()
    assert kinds[1] == F.plan("float32", "label", "int32", 10, 4, H100, tile_vec=4).variant.expr()
    assert kinds[2] == F.plan("float32", "label", "int64", 999, 1, H100).variant.expr()
    none = _named(host.launches[1][3], "tile")
    assert none["loss_out"] is not None and none["total_out"] is None and none["c"] == 10
    assert _named(host.launches[2][3], "block")["c"] == 999


def test_options_are_part_of_the_signature(host):
    x, y = _inputs(host, 256, 1000)
    for eps in (0.0, 0.1):
        gpuce.softmax_cross_entropy(x, y, reduction="sum", label_smoothing=eps, check_labels=False)
    assert len(F._RECIPES) == 2
    a0, a1 = (_named(args, "block") for _, _, _, args, _ in host.launches)
    assert a0["eps_over_c"] == 0.0 and a1["eps_over_c"] == np.float32(0.1 / 1000)
    assert a1["one_minus_eps"] == np.float32(0.9)


def test_by_value_arguments_pass_through_cupy_as_they_are():
    """The recipe's scalars are CuPy's by-value argument holders (CPointer), which its launch
    passes on without converting them again; the bytes they point at are the NumPy scalar's,
    in its width."""
    import ctypes

    from cupy.cuda.function import CPointer

    for v, ct in ((np.int32(-3), ctypes.c_int32), (np.int64(-100), ctypes.c_int64), (np.float32(0.1), ctypes.c_float),
                  (np.float64(0.25), ctypes.c_double), (np.int64(2**40 + 5), ctypes.c_int64)):
        h = F.by_value(v)
        assert isinstance(h, CPointer)
        assert ct.from_address(h.ptr).value == v
        assert ctypes.string_at(h.ptr, v.itemsize) == v.tobytes()


@pytest.mark.parametrize("change", ["rows", "ignore_index", "z_loss", "softcap", "weight", "no grad", "smoothing",
                                    "probabilities"])
def test_every_signature_part_reaches_the_launch(host, change):
    """A call that differs from the previous one in one part of its signature gets that part
    in its launch (a recipe remembered without it would pass the previous call's value)."""
    n, c = 256, 1000
    x, y = _inputs(host, n, c)
    base = dict(reduction="sum", return_grad=True, check_labels=False)
    gpuce.softmax_cross_entropy(x, y, **base)
    args, target = dict(base), y
    if change == "rows":
        x, y = _inputs(host, 2 * n, c)
        target = y
    elif change == "ignore_index":
        args["ignore_index"] = -1
    elif change == "z_loss":
        args["z_loss"] = 1e-3
    elif change == "softcap":
        args["softcap"] = 30.0
    elif change == "weight":
        args["weight"] = host.array((c,), np.float32)
    elif change == "no grad":
        args["return_grad"] = False
    elif change == "smoothing":
        args["label_smoothing"] = 0.25
    else:
        target = host.array((n, c), np.float32)
        args["ignore_index"] = -100
    gpuce.softmax_cross_entropy(x, target, **args)
    assert len(F._RECIPES) == 2
    expr, grid, block, launched, _ = host.launches[-1]
    plan = next(r.plan for r in F._RECIPES.values() if r.plan.variant.expr() == expr)
    a = _named(launched, plan.variant.kind)
    rows = x.shape[0]
    assert a["x"] is x and a["n"] == rows and a["c"] == c
    assert a["ignore_index"] == args.get("ignore_index", -100)
    assert a["z"] == np.float32(args.get("z_loss", 0.0)) and a["cap"] == np.float32(args.get("softcap", 0.0))
    eps = args.get("label_smoothing", 0.0)
    assert a["eps_over_c"] == np.float32(eps / c) and a["one_minus_eps"] == np.float32(1 - eps)
    assert (a["grad"] is None) == (not args["return_grad"]) and a["ldg"] == (c if args["return_grad"] else 0)
    assert (a["w"] is None) == ("weight" not in args)
    if change == "probabilities":
        assert a["y"] is target and a["labels"] is None and a["ldy"] == c and ", 1, " in expr
    else:
        assert a["labels"] is target and a["y"] is None
    assert grid == (F.grid_blocks(plan, rows, H100, 2),) and block == (plan.threads,)
    if "weight" in args:  # the weights' check runs in the prologue
        assert host.launches[-2][0].startswith("gpuce::sce_prologue") and host.launches[-2][3][1] is args["weight"]


def test_the_targets_layout_is_part_of_the_signature(host):
    """Probability targets laid out otherwise (another row stride, off their 16-byte granules)
    change the plan's pack width and the targets' row stride."""
    n, c = 256, 1000
    x = host.array((n, c), np.float32)
    gpuce.softmax_cross_entropy(x, host.array((n, c), np.float32), reduction="sum", check_labels=False)
    wide = host.array((n, c + 1), np.float32)[:, 1:]
    gpuce.softmax_cross_entropy(x, wide, reduction="sum", check_labels=False)
    assert len(F._RECIPES) == 2
    (e0, *_, a0, _), (e1, *_, a1, _) = host.launches
    assert ", 1, 4, " in e0 and ", 1, 1, " in e1  # 16-byte packs, then one value a pack
    assert _named(a0, "block")["ldy"] == c and _named(a1, "block")["ldy"] == c + 1
    assert _named(a1, "block")["y"] is wide


def test_a_given_denominator_is_passed_at_launch_not_remembered(host):
    """Row blocks of a larger "mean" call (the block walk, the linear model's chunks) carry the
    whole call's denominator: no prologue computes it, the kernel gets 1/denominator, and
    calls that differ only in its value share one recipe (a training loop's every step has
    another denominator)."""
    from dataclasses import replace

    from gpuce._cuda.sce import softmax_cross_entropy as run
    from gpuce._validation import sce_args

    x, y = _inputs(host, 256, 1000)
    args = sce_args(x, y, reduction="mean", ignore_index=-100, weight=None, label_smoothing=0.0,
                    z_loss=0.0, return_grad=True, inplace=False, check_labels=False)
    F._RECIPES.clear()
    for denominator in (512.0, 1000.0, 0.0):
        host.launches.clear()
        grad = host.array((256, 1000), np.float32)
        run(x, y, None, replace(args, denominator=denominator), grad)
        assert len(host.launches) == 1  # no prologue: the denominator is known
        a = _named(host.launches[0][3], F.plan("float32", "label", "int64", 1000, 4, H100).variant.kind)
        assert a["inv_from_ws"] == 0
        assert a["inv_denom"] == (0.0 if denominator == 0 else 1.0 / denominator)
    assert len(F._RECIPES) == 1


class _PerThreadDefaultStream:
    """CuPy's per-thread default stream as every thread sees it: the one handle 2
    (cudaStreamPerThread), each thread's launches on its own stream."""

    ptr = 2

    def is_capturing(self):
        return False


class _ByThread(list):
    """host.launches that remember which host thread made each launch."""

    def append(self, launch):
        super().append((threading.current_thread(), launch))


def test_threads_sharing_a_stream_handle_get_their_own_workspace(host, monkeypatch):
    """Two host threads on CuPy's per-thread default stream (one handle, two streams): each
    thread's prologue and fused kernel share the thread's workspace (the denominator, the
    ticket and the partial slots), and the two threads' workspaces are different buffers.  A
    workspace keyed by (device, stream handle) alone gave both threads one buffer."""
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: _PerThreadDefaultStream())
    host.launches = _ByThread()
    x, y = _inputs(host, 4096, 1000)
    errors = []

    def calls():
        try:
            for _ in range(3):
                gpuce.softmax_cross_entropy(x, y, check_labels=False)  # "mean": prologue + kernel
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=calls) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    kind = F.plan("float32", "label", "int64", 1000, 4, H100).variant.kind
    used = {}
    for thread, (expr, _, _, args, _) in host.launches:
        ws = _named(args, "sce_prologue" if expr == F.prologue_expr("int64", "float32") else kind)["ws"]
        used.setdefault(thread, set()).add(id(ws))
    assert len(host.launches) == 2 * 3 * 2 and len(used) == 2
    (a,), (b,) = used.values()  # one workspace a thread, for all its launches
    assert a != b
    # the main thread has none yet: its first call makes its own
    assert (0, 2) not in F._WORKSPACES.by_stream
