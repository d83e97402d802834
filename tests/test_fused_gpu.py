"""The fused path's call contract on a GPU: no host sync before the last launch (the call is
captured into a CUDA graph, which fails on any sync), bit-identical results run to run, a bad
label raising ValueError with the device still usable, check_labels=False giving NaN rows,
and torch's current stream.  Skipped without a GPU."""

import zlib

import numpy as np
import pytest

import gpuce

pytestmark = pytest.mark.gpu


def _inputs(cp, n, c, dtype="float32", seed="x"):
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    x = cp.asarray((rng.standard_normal((n, c)) * 3).astype(dtype))
    y = cp.asarray(rng.integers(0, c, n))
    y[::7] = -100
    return x, y


@pytest.mark.parametrize("c", [10, 1000, 4096, 40000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_call_has_no_host_sync(c, reduction):
    """With check_labels=False the whole call is captured into a CUDA graph (a host sync or
    a read-back inside the capture is an error), and replaying it gives the eager result."""
    import cupy as cp

    x, y = _inputs(cp, 513, c, seed=f"sync-{c}")
    ref = gpuce.softmax_cross_entropy(x, y, reduction=reduction, return_grad=True, check_labels=False)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        gpuce.softmax_cross_entropy(x, y, reduction=reduction, return_grad=True, check_labels=False)  # warm
        s.synchronize()
        s.begin_capture()
        out = gpuce.softmax_cross_entropy(x, y, reduction=reduction, return_grad=True, check_labels=False)
        graph = s.end_capture()
        graph.launch()
        s.synchronize()
    np.testing.assert_array_equal(out[0].get(), ref[0].get())
    np.testing.assert_array_equal(out[1].get(), ref[1].get())


@pytest.mark.parametrize("c", [10, 100, 4096, 131072])
def test_bit_identical_run_to_run(c):
    import cupy as cp

    x, y = _inputs(cp, max(64, 2**22 // c), c, seed=f"bits-{c}")
    a = gpuce.softmax_cross_entropy(x, y, return_grad=True, return_stats=True)
    for _ in range(3):
        b = gpuce.softmax_cross_entropy(x, y, return_grad=True, return_stats=True)
        assert a[0].get().tobytes() == b[0].get().tobytes()
        assert a[1].get().tobytes() == b[1].get().tobytes()
        assert a[2].accuracy.get().tobytes() == b[2].accuracy.get().tobytes()


@pytest.mark.parametrize("impl", ["fused", "portable"])
def test_bad_label_raises_and_the_device_stays_usable(impl):
    import cupy as cp

    x, y = _inputs(cp, 300, 1000, seed="bad")
    y[123] = 1000
    y[200] = -5
    with pytest.raises(ValueError, match=r"label 1000 at position \(123,\)"):
        gpuce.softmax_cross_entropy(x, y, return_grad=True, impl=impl)
    y[123] = 3
    y[200] = 4
    loss, grad = gpuce.softmax_cross_entropy(x, y, return_grad=True, impl=impl)  # the next call works
    l_np, g_np = gpuce.softmax_cross_entropy(x.get(), y.get(), return_grad=True)
    np.testing.assert_allclose(loss.get(), l_np, rtol=1e-5)
    np.testing.assert_allclose(grad.get(), g_np, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("impl", ["fused", "portable"])
def test_check_labels_false_gives_nan_rows(impl):
    import cupy as cp

    x, y = _inputs(cp, 40, 100, seed="nanrows")
    y[5] = 100
    loss, grad = gpuce.softmax_cross_entropy(x, y, reduction="none", return_grad=True, check_labels=False,
                                             impl=impl)
    loss, grad = loss.get(), grad.get()
    assert np.isnan(loss[5]) and np.isnan(grad[5]).all()
    ok = np.arange(40) != 5
    assert np.isfinite(loss[ok]).all() and np.isfinite(grad[ok]).all()


def test_two_streams_keep_their_own_workspace():
    """Concurrent calls on two streams (each with its own ticket and partials) give the
    results of the calls made one at a time."""
    import cupy as cp

    x, y = _inputs(cp, 4096, 1000, seed="streams")
    want = [gpuce.softmax_cross_entropy(x[i::2], y[i::2]).get() for i in range(2)]
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
    outs = []
    for _ in range(5):
        for i, s in enumerate(streams):
            with s:
                outs.append((i, gpuce.softmax_cross_entropy(x[i::2], y[i::2])))
    for s in streams:
        s.synchronize()
    for i, o in outs:
        assert o.get() == want[i]


def test_threads_on_the_per_thread_default_stream_keep_their_own_workspace():
    """Two host threads on CuPy's per-thread default stream (one handle, two streams running
    at once), each with "mean" calls (the prologue's denominator travels in the workspace):
    the results of the calls made one at a time, bit for bit."""
    import threading

    import cupy as cp

    x, y = _inputs(cp, 4096, 1000, seed="ptds")
    y[::5] = -100  # another denominator for each half
    want = [gpuce.softmax_cross_entropy(x[i::2], y[i::2]).get() for i in range(2)]
    got = [[], []]
    errors = []

    def calls(i):
        try:
            with cp.cuda.Stream.ptds:
                outs = [gpuce.softmax_cross_entropy(x[i::2], y[i::2]) for _ in range(20)]
                got[i] = [o.get() for o in outs]
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=calls, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        assert len(got[i]) == 20 and all(g == want[i] for g in got[i])


def test_explain_says_which_kernel():
    import cupy as cp

    from gpuce._cuda import fused

    x, _ = _inputs(cp, 8, 32768, seed="explain")
    s = fused.explain(x)
    assert "sce_" in s and "grid" in s


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("c", [50257, 1001, 77])
def test_rows_off_a_16_byte_boundary_in_place(dtype, c):
    """A view one column into a wider array (every row off its 16-byte boundary, the base too)
    with the gradient written in place: the 16-byte-pack path with masked edge packs, the
    logits and the gradient aliased; neighbouring columns untouched."""
    import cupy as cp

    from gpuce._validation import bfloat16_dtype

    dt = bfloat16_dtype() if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(zlib.crc32(f"shifted-{c}-{dtype}".encode()))
    n = 37
    base_np = (rng.standard_normal((n, c + 2)) * 3).astype(dt)
    y = rng.integers(0, c, n)
    want_loss, want_grad = gpuce.softmax_cross_entropy(base_np[:, 1:-1], y, return_grad=True)
    base = cp.asarray(base_np)
    x = base[:, 1:-1]
    loss, g = gpuce.softmax_cross_entropy(x, cp.asarray(y), return_grad=True, inplace=True)
    rtol = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(loss.get(), want_loss, rtol=rtol)
    got = base.get()
    np.testing.assert_allclose(got[:, 1:-1].astype(np.float64), want_grad.astype(np.float64), rtol=rtol,
                               atol=rtol / n)
    np.testing.assert_array_equal(got[:, 0], base_np[:, 0])  # the neighbours are not written
    np.testing.assert_array_equal(got[:, -1], base_np[:, -1])


def test_first_call_inside_a_capture_raises():
    import cupy as cp

    x, y = _inputs(cp, 64, 100, seed="capture-first")
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="before capturing"):
                gpuce.softmax_cross_entropy(x, y, check_labels=False)
        finally:
            s.end_capture()


@pytest.mark.parametrize("impl", ["fused", "portable"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bad_class_weight_raises_after_the_launch_or_gives_nan(impl, reduction):
    """A NaN class weight on CuPy: the kernels' read-back raises the ValueError naming it;
    with check_labels=False (no read-back) the results are NaN, never silently wrong."""
    import cupy as cp

    x, y = _inputs(cp, 64, 100, seed="badw")
    w = cp.ones(100, cp.float32)
    w[7] = np.nan
    with pytest.raises(ValueError, match=r"weight\[7\] = nan"):
        gpuce.softmax_cross_entropy(x, y, weight=w, reduction=reduction, return_grad=True, impl=impl)
    loss, grad = gpuce.softmax_cross_entropy(x, y, weight=w, reduction=reduction, return_grad=True, impl=impl,
                                             check_labels=False)
    active = (y != -100).get()
    assert np.isnan(np.atleast_1d(loss.get())[active if reduction == "none" else slice(None)]).all()
    assert np.isnan(grad.get()[active]).all()
    w[7] = -2.0  # the next call works: a negative weight is a weight (as torch)
    loss, _ = gpuce.softmax_cross_entropy(x, y, weight=w, reduction=reduction, return_grad=True, impl=impl)
    assert np.isfinite(loss.get()).all()


@pytest.mark.parametrize("impl", ["fused", "portable"])
def test_in_place_error_leaves_the_logits_untouched(impl):
    import cupy as cp

    x, y = _inputs(cp, 64, 100, seed="inplace-error")
    y[9] = 1000
    before = x.copy()
    with pytest.raises(ValueError, match=r"label 1000 at position \(9,\)"):
        gpuce.softmax_cross_entropy(x, y, return_grad=True, inplace=True, impl=impl)
    assert bool((x == before).all())


@pytest.mark.parametrize("target", ["label", "prob"])
@pytest.mark.parametrize("c", [10, 32])
def test_tile_ring_over_many_tiles_in_place(target, c):
    """The tile kernel's cp.async ring on hardware: 100003 rows on 4 blocks (about 200 tiles a
    block through the 3-stage ring, the last one partial), the gradient written in place over
    the logits, against the NumPy path on the same inputs."""
    import cupy as cp

    from gpuce._cuda import fused

    rng = np.random.default_rng(zlib.crc32(f"tile-{target}-{c}".encode()))
    n = 100003
    xh = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    if target == "label":
        th = rng.integers(0, c, n)
        th[::7] = -100
    else:
        th = rng.random((n, c)).astype(np.float32)
        th /= th.sum(1, keepdims=True)
    want_loss, want_grad = gpuce.softmax_cross_entropy(xh, th, reduction="none", return_grad=True)
    x, t = cp.asarray(xh), cp.asarray(th)
    lbl = t if target == "label" else None
    loss = cp.empty(n, cp.float32)
    plan = fused.launch(x, lbl, None if lbl is not None else t, None, acc=np.dtype(np.float32), eps=0.0, z=0.0,
                        softcap=0.0, ignore_index=-100, reduction="none", loss_out=loss, lse_out=None,
                        correct_out=None, grad_out=x, total_out=None, stats_out=None, bad_out=None, grid=4)
    assert plan.variant.kind == "tile"
    np.testing.assert_allclose(loss.get(), want_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(x.get(), want_grad, rtol=2e-5, atol=1e-6)


def test_cluster_count_query_answers_on_hopper():
    """cuOccupancyMaxActiveClusters (called through ctypes: CuPy has no binding) answers for
    the cluster kernels, within what the SMs could hold, and the launch grid respects it."""
    from gpuce._cuda import fused

    dev = fused.current_device()
    if dev.arch < 90:
        pytest.skip("thread-block clusters need sm_90")
    for c in (32768, 131072):
        p = fused.plan("float32", "label", "int64", c, 4, dev)
        cl = p.variant.cluster
        assert cl > 1
        expr = p.variant.expr()
        per_sm = fused._occupancy(expr, p.threads, p.smem)
        held = fused._clusters_on(fused.device_id(), expr, p.threads, p.smem, cl)
        assert held is not None and 1 <= held <= dev.sms * per_sm // cl, (c, held, per_sm)
        assert fused.grid_blocks(p, 10**6, dev, per_sm, held) <= held * cl
