"""gpuce.use_impl (what impl="auto" means, per thread and task) and gpuce.explain (which
backend, path and kernel a call would take)."""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest

import gpuce
from gpuce import _impl, _rows, sce


def test_use_impl_sets_auto_for_the_block_only():
    assert _impl.resolve_impl("auto") == "fused"
    with gpuce.use_impl("portable") as chosen:
        assert chosen == "portable"
        assert _impl.resolve_impl("auto") == "portable"
        assert _impl.resolve_impl("fused") == "fused"  # an explicit impl wins
        with gpuce.use_impl("fused"):
            assert _impl.resolve_impl() == "fused"
        assert _impl.resolve_impl() == "portable"
    assert _impl.resolve_impl() == "fused"


def test_use_impl_is_reset_after_an_error():
    with pytest.raises(KeyError):
        with gpuce.use_impl("portable"):
            raise KeyError
    assert _impl.auto_impl() == "fused"


@pytest.mark.parametrize("bad", ["auto", "numpy", None, 1])
def test_use_impl_rejects_other_values(bad):
    with pytest.raises(ValueError, match="'fused' or 'portable'"):
        with gpuce.use_impl(bad):
            pass
    if bad != "auto":
        with pytest.raises(ValueError, match="impl must be one of"):
            gpuce.softmax_cross_entropy(np.zeros((2, 3)), np.zeros(2, int), impl=bad)


def test_use_impl_is_per_thread():
    """One thread's choice never shows in another's calls (a module global would)."""
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def worker():
        with gpuce.use_impl("portable"):
            inside.set()
            release.wait(10)
            seen["worker"] = _impl.auto_impl()

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    seen["main"] = _impl.auto_impl()
    release.set()
    t.join(10)
    assert seen == {"main": "fused", "worker": "portable"}


class _FakeDeviceModule:
    """Stands for cupy in run_rows (gpuce._rows; anything that is not numpy takes the CuPy branch)."""


def test_run_rows_passes_the_chosen_impl_to_the_gpu_backend(monkeypatch):
    pytest.importorskip("cupy")
    from gpuce._cuda import sce as cuda_sce

    calls = []
    monkeypatch.setattr(cuda_sce, "softmax_cross_entropy",
                        lambda *args, impl, **kw: calls.append(impl) or "rows")
    monkeypatch.setattr(_impl, "fused_runs_here", lambda: True)
    fake = _FakeDeviceModule()
    args = types.SimpleNamespace(return_stats=False)
    assert sce.run_rows(fake, None, None, None, args, None) == "rows"
    with gpuce.use_impl("portable"):
        sce.run_rows(fake, None, None, None, args, None)
        sce.run_rows(fake, None, None, None, args, None, impl="fused")
    assert calls == ["fused", "portable", "fused"]


@pytest.mark.parametrize("arch,runs", [(70, False), (75, False), (80, True), (86, True), (90, True)])
def test_fused_needs_compute_capability_8(monkeypatch, arch, runs):
    """Below compute capability 8.0 (a V100, a T4) the fused kernels cannot run (cp.async,
    bfloat16 arithmetic, max.NaN): every request for them runs the portable kernels there,
    the token and distillation rows take their array rows, and explain says why."""
    pytest.importorskip("cupy")
    from gpuce._cuda import fused as F
    from gpuce._cuda import sce as cuda_sce

    monkeypatch.setattr(F, "_device", lambda dev_id: F.Device(arch=arch, sms=80, smem_optin=96 * 1024))
    monkeypatch.setattr(F, "device_id", lambda: 0)
    assert _impl.fused_runs_here() is runs
    calls = []
    monkeypatch.setattr(cuda_sce, "softmax_cross_entropy",
                        lambda *args, impl, **kw: calls.append(impl) or "rows")
    fake = _FakeDeviceModule()
    args = types.SimpleNamespace(return_stats=False)
    sce.run_rows(fake, None, None, None, args, None)
    sce.run_rows(fake, None, None, None, args, None, impl="fused")
    sce.run_rows(fake, None, None, None, args, None, impl="portable")
    want = "fused" if runs else "portable"
    assert calls == [want, want, "portable"]
    assert _impl.device_impl() == want and _impl.resolve_impl() == "fused"
    a = types.SimpleNamespace(kind="label", n=0)
    lines = _rows.explain_rows(fake, None, None, a, "auto", walk=False)
    assert lines[1].startswith(f"path: {want} ")
    assert ("compute capability 8.0" in lines[1]) is (not runs)


def test_dask_graph_takes_the_choice_in_force_when_built(monkeypatch):
    da = pytest.importorskip("dask.array")
    from gpuce import _dask

    seen = []
    part = _dask._sce_part
    monkeypatch.setattr(_dask, "_sce_part",
                        lambda run, *args: seen.append(args[5]["impl"]) or part(run, *args))
    x, y = da.zeros((4, 3), chunks=(2, 3)), da.zeros(4, chunks=2, dtype=np.int64)
    with gpuce.use_impl("portable"):
        loss = gpuce.softmax_cross_entropy(x, y)
    assert float(loss.compute(scheduler="sync")) == pytest.approx(np.log(3))  # computed outside
    float(gpuce.softmax_cross_entropy(x, y).compute(scheduler="sync"))
    assert seen == ["portable", "portable", "fused", "fused"]


def test_dask_linear_blocks_run_under_the_choice_in_force_when_built(monkeypatch):
    from gpuce import _dask

    seen = []

    def run(*args, **kw):
        seen.append(_impl.auto_impl())
        raise StopIteration  # the block's result is not needed

    a = gpuce._validation.sce_args(np.zeros((2, 3)), np.zeros(2, np.int64), reduction="sum",
                                   ignore_index=-100, weight=None, label_smoothing=0.0, z_loss=0.0,
                                   return_grad=False, inplace=False)
    with pytest.raises(StopIteration):
        _dask._linear_part(run, None, np.zeros(2, np.int64), None, None, None, a, 0,
                           {"impl": "portable"})
    assert seen == ["portable"] and _impl.auto_impl() == "fused"


# ---------------------------------------------------------------------------------- explain

def test_explain_numpy():
    text = gpuce.explain(np.zeros((4, 10), np.float32), np.zeros(4, np.int64))
    assert text.splitlines() == [
        "backend: NumPy (the logits are a numpy.ndarray)",
        "path: gpuce._sce_numpy: chunked passes over the rows on the CPU, float32 accumulation"]
    assert "float64 accumulation" in gpuce.explain(np.zeros((2, 3)), np.full((2, 3), 1 / 3))


def test_explain_block_walk_and_empty():
    x = np.zeros((3, 4, 10), np.float32).transpose(1, 0, 2)
    assert "walked in blocks" in gpuce.explain(x, np.zeros((4, 3), np.int64))
    assert "no rows" in gpuce.explain(np.zeros((0, 10), np.float32), np.zeros(0, np.int64))


def test_explain_dask():
    da = pytest.importorskip("dask.array")
    x, y = da.zeros((100, 10), chunks=(50, 10)), da.zeros(100, chunks=50, dtype=np.int64)
    text = gpuce.explain(x, y)
    assert text.startswith("backend: dask (2 row block(s) of numpy.ndarray chunks)")
    with gpuce.use_impl("portable"):
        assert "impl 'portable' on CuPy chunks" in gpuce.explain(x, y)


def test_explain_checks_as_the_call_does():
    x = np.zeros((4, 10), np.float32)
    with pytest.raises(ValueError, match="reduction"):
        gpuce.explain(x, np.zeros(4, np.int64), reduction="avg")
    with pytest.raises(ValueError):
        gpuce.explain(x, np.zeros(5, np.int64))
    with pytest.raises(TypeError):
        gpuce.explain(x, np.zeros(4, np.int64), no_such_option=1)
    with pytest.raises(ValueError, match="impl"):
        gpuce.explain(x, np.zeros(4, np.int64), impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["label", "prob"])
def test_explain_cupy(kind):
    import cupy as cp

    x = cp.zeros((64, 1000), cp.float32)
    t = cp.zeros(64, cp.int64) if kind == "label" else cp.full((64, 1000), 1e-3, cp.float32)
    text = gpuce.explain(x, t)
    assert text.splitlines()[:2] == ["backend: CuPy (the logits are a cupy.ndarray)",
                                     "path: fused (impl='auto' means 'fused' here)"]
    assert text.splitlines()[2].startswith("kernel: ")
    with gpuce.use_impl("portable"):
        assert "path: portable (impl='auto' means 'portable' here (set by gpuce.use_impl))" in gpuce.explain(x, t)
    if kind == "prob":
        assert "path: portable" in gpuce.explain(x, t.astype(cp.float16))


def test_explain_raises_for_the_values_the_call_raises_for():
    """A label out of range, a NaN or infinite class weight: the call's errors."""
    x = np.zeros((3, 4), np.float32)
    y = np.array([0, 4, 1])
    for fn in (gpuce.softmax_cross_entropy, gpuce.explain):
        with pytest.raises(ValueError, match=r"label 4 at position \(1,\) is out of range"):
            fn(x, y)
        for bad in (np.nan, np.inf, -np.inf):
            w = np.ones(4, np.float32)
            w[2] = bad
            with pytest.raises(ValueError, match=r"class weights must be finite, got weight\[2\]"):
                fn(x, np.array([0, 1, 2]), weight=w)
        with pytest.raises(ValueError, match="out of range"):
            fn(x, np.array([0, 2**63 + 5, 1], np.uint64))
    # what the call allows, explain allows: check_labels=False, an ignored label
    assert "NumPy" in gpuce.explain(x, np.array([0, 9, 1]), check_labels=False)
    assert "NumPy" in gpuce.explain(x, np.array([0, -100, 1]))
