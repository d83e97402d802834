"""Dask arrays chunked by rows, on a dask.distributed LocalCluster with 2 worker processes:
every result equals the single-array path; bad chunking gets a clear error."""

import itertools
import math
import zlib

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

import gpuce  # noqa: E402
from dask.utils import key_split  # noqa: E402
from test_linear import data  # noqa: E402


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, worker_dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def split(a, rows=(13, 40, 1, 26)):
    """A dask array of ``a`` with uneven row chunks (sizes must add up to len(a))."""
    assert sum(rows) == a.shape[0]
    return da.from_array(a, chunks=(rows,) + tuple((s,) for s in a.shape[1:]))


def assert_same(got, want, rtol=1e-12, atol=1e-14):
    if want is None:
        assert got is None
        return
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol)


@pytest.mark.parametrize("fn", [gpuce.softmax, gpuce.log_softmax, gpuce.logsumexp, gpuce.entropy])
def test_rowwise_one_input(client, fn):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 9)) * 4
    if fn is gpuce.entropy:
        x = gpuce.softmax(x)
    x[3] = -np.inf
    x[5, 2] = np.nan
    got = fn(split(x))
    assert isinstance(got, da.Array)
    assert_same(got.compute(), fn(x))
    # the reduced axis may be any axis that is whole; the others may be chunked
    xt = np.ascontiguousarray(x.T)
    got = fn(da.from_array(xt, chunks=(9, 20)), axis=0)
    assert_same(got.compute(), fn(xt, axis=0))


@pytest.mark.parametrize("fn", [gpuce.cross_entropy, gpuce.kl_div])
def test_rowwise_two_inputs(client, fn):
    rng = np.random.default_rng(1)
    p = gpuce.softmax(rng.standard_normal((80, 6)))
    q = gpuce.softmax(rng.standard_normal((80, 6)))
    assert_same(fn(split(p), split(q)).compute(), fn(p, q))
    assert_same(fn(split(p), q).compute(), fn(p, q))  # an in-memory operand takes the rows' chunks


OPTS = list(itertools.product(["label", "prob"], ["mean", "sum", "none"], [False, True], [0.0, 0.1]))


@pytest.mark.parametrize("kind,reduction,weighted,smoothing", OPTS)
def test_softmax_cross_entropy(client, kind, reduction, weighted, smoothing):
    rng = np.random.default_rng(zlib.crc32(repr((kind, reduction, weighted, smoothing)).encode()))
    x = rng.standard_normal((80, 7)) * 3
    if kind == "label":
        t = rng.integers(0, 7, 80)
        t[:13] = -100  # the first block is all ignored
        t[rng.random(80) < 0.2] = -100
    else:
        t = gpuce.softmax(rng.standard_normal((80, 7)))
    w = rng.random(7) + 0.5 if weighted else None
    kw = dict(reduction=reduction, weight=w, label_smoothing=smoothing, z_loss=1e-3, return_grad=True)
    loss, grad = gpuce.softmax_cross_entropy(split(x), split(t), **kw)
    assert isinstance(loss, da.Array) and isinstance(grad, da.Array)
    loss, grad = dask.compute(loss, grad)
    want_loss, want_grad = gpuce.softmax_cross_entropy(x, t, **kw)
    assert_same(loss, want_loss)
    assert_same(grad, want_grad)
    only = gpuce.softmax_cross_entropy(split(x), split(t), **{**kw, "return_grad": False})
    assert_same(only.compute(), want_loss)


@pytest.mark.parametrize("kind,reduction", list(itertools.product(["label", "prob"],
                                                                  ["mean", "sum", "none"])))
def test_linear_cross_entropy(client, kind, reduction):
    rng = np.random.default_rng(zlib.crc32(repr(("lin", kind, reduction)).encode()))
    X, W, y = data(rng, 80, 5, 6, kind, np.float64)
    b = rng.standard_normal(6)
    w = rng.random(6) + 0.5
    kw = dict(bias=b, weight=w, reg=0.2, reduction=reduction, label_smoothing=0.05,
              return_grad=True)
    loss, g = gpuce.linear_cross_entropy(split(X), W, split(y), **kw)
    loss, g = dask.compute(loss, g)
    want_loss, want = gpuce.linear_cross_entropy(X, W, y, **kw)
    assert_same(loss, want_loss)
    for got_, want_ in zip(g, want):
        assert_same(got_, want_, atol=1e-13)
    # chunk_size inside each block and input_grad=False pass through
    loss2, g2 = dask.compute(*gpuce.linear_cross_entropy(split(X), W, split(y), input_grad=False,
                                                         chunk_size=3, **kw))
    assert g2.X is None
    assert_same(loss2, want_loss)
    assert_same(g2.W, want.W, atol=1e-13)


def assert_same_stats(got, want):
    assert isinstance(got, gpuce.SceStats)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            assert isinstance(g, da.Array)
    got = dask.compute(*got)
    for g, w in zip(got, want):
        assert_same(g, w)


@pytest.mark.parametrize("kind,reduction", list(itertools.product(["label", "prob"],
                                                                  ["mean", "sum", "none"])))
def test_softcap_and_stats(client, kind, reduction):
    """softcap and return_stats over blocks equal the in-memory call; the statistics reduce
    across blocks like the loss (accuracy = correct rows / counted rows, a first block with
    no counted row included)."""
    rng = np.random.default_rng(zlib.crc32(repr(("stats", kind, reduction)).encode()))
    x = rng.standard_normal((80, 7)) * 3
    x[20, 2] = x[20].max()  # a tie at the maximum
    if kind == "label":
        t = rng.integers(0, 7, 80)
        t[:13] = -100
        t[20] = 2
    else:
        t = gpuce.softmax(rng.standard_normal((80, 7)))
    kw = dict(reduction=reduction, z_loss=1e-2, softcap=2.5, label_smoothing=0.1,
              return_grad=True, return_stats=True)
    loss, grad, st = gpuce.softmax_cross_entropy(split(x), split(t), **kw)
    want_loss, want_grad, want_st = gpuce.softmax_cross_entropy(x, t, **kw)
    loss, grad = dask.compute(loss, grad)
    assert_same(loss, want_loss)
    assert_same(grad, want_grad)
    assert_same_stats(st, want_st)
    loss, st = gpuce.softmax_cross_entropy(split(x), split(t), **{**kw, "return_grad": False})
    assert_same(loss.compute(), want_loss)
    assert_same_stats(st, want_st)

    X, W, y = data(rng, 80, 5, 7, kind, np.float64)
    kw = dict(reduction=reduction, z_loss=1e-2, softcap=2.5, reg=0.1, return_grad=True,
              return_stats=True)
    loss, g, st = gpuce.linear_cross_entropy(split(X), W, split(y), **kw)
    want_loss, want_g, want_st = gpuce.linear_cross_entropy(X, W, y, **kw)
    loss, g = dask.compute(loss, g)
    assert_same(loss, want_loss)
    for got_, want_ in zip(g, want_g):
        assert_same(got_, want_, atol=1e-13)
    assert_same_stats(st, want_st)
    loss, st = gpuce.linear_cross_entropy(split(X), W, split(y), chunk_size=4,
                                          **{**kw, "return_grad": False})
    assert_same(loss.compute(), want_loss)
    assert_same_stats(st, want_st)


def test_check_labels_false(client):
    rng = np.random.default_rng(zlib.crc32(b"dask check_labels"))
    x = rng.standard_normal((80, 7))
    t = rng.integers(0, 7, 80)
    t[50] = 9
    with pytest.raises(ValueError, match=r"label 9 at position \(50,\)"):
        gpuce.softmax_cross_entropy(split(x), split(t)).compute()
    for reduction in ("none", "mean"):
        got = gpuce.softmax_cross_entropy(split(x), split(t), reduction=reduction,
                                          check_labels=False).compute()
        want = gpuce.softmax_cross_entropy(x, t, reduction=reduction, check_labels=False)
        assert_same(got, want)
        assert np.isnan(got).any() and (reduction == "mean" or np.isfinite(np.delete(got, 50)).all())
    X, W, _ = data(rng, 80, 4, 7, "label", np.float64)
    got = gpuce.linear_cross_entropy(split(X), W, split(t), reduction="mean",
                                     check_labels=False, weight=np.ones(7)).compute()
    assert math.isnan(float(got))


def test_bad_softcap_raises_when_the_graph_is_built():
    x, t = split(np.zeros((80, 3))), split(np.zeros(80, np.int64))
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="softcap"):
            gpuce.softmax_cross_entropy(x, t, softcap=bad)
        with pytest.raises(ValueError, match="softcap"):
            gpuce.linear_cross_entropy(x, np.zeros((4, 3)), t, softcap=bad)
    with pytest.raises(TypeError, match="softcap"):
        gpuce.softmax_cross_entropy(x, t, softcap=True)


def test_large_operands_are_broadcast(client, monkeypatch):
    """With a client, W at least SCATTER_MIN_BYTES goes to the workers by Client.scatter."""
    import gpuce._dask as D

    monkeypatch.setattr(D, "SCATTER_MIN_BYTES", 0)
    rng = np.random.default_rng(6)
    X, W, y = data(rng, 80, 5, 6, "label", np.float64)
    loss, g = gpuce.linear_cross_entropy(split(X), W, split(y), bias=np.ones(6), reg=0.1,
                                         return_grad=True)
    graph = {**dict(loss.__dask_graph__()), **dict(g.W.__dask_graph__())}
    assert not any(key_split(k) == "gpuce-W" for k in graph)
    loss, g = dask.compute(loss, g)
    want_loss, want = gpuce.linear_cross_entropy(X, W, y, bias=np.ones(6), reg=0.1, return_grad=True)
    assert_same(loss, want_loss)
    for got_, want_ in zip(g, want):
        assert_same(got_, want_, atol=1e-13)


def test_graph_is_a_tree_with_one_key_per_operand():
    """For "mean": one denominator task per label block and blocks - 1 additions (the
    blocks scale their gradients by it), then one part task per block, blocks - 1 additions,
    one finish; W (240 bytes, below the scatter threshold) is one key."""
    rng = np.random.default_rng(2)
    X, W, y = data(rng, 80, 5, 6, "label", np.float64)
    loss, g = gpuce.linear_cross_entropy(split(X), W, split(y), return_grad=True)
    graph = {**dict(loss.__dask_graph__()), **dict(g.W.__dask_graph__())}
    names = [key_split(k) for k in graph]
    assert names.count("gpuce-denominator") == 4
    assert names.count("gpuce-linear-part") == 4
    assert names.count("gpuce-combine") == 3 + 3
    assert names.count("gpuce-linear-finish") == 1
    assert names.count("gpuce-W") == 1


def test_classifier_fit_on_dask(client):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = X[:600], y[:600]
    kw = dict(reg=1.0, max_iter=60, tol=1e-8)
    ref = gpuce.SoftmaxClassifier(**kw).fit(X, y)
    Xd = da.from_array(X, chunks=(150, 64))
    clf = gpuce.SoftmaxClassifier(**kw).fit(Xd, da.from_array(y, chunks=150))
    # the same objective and gradients each iteration; sums in another order may steer
    # L-BFGS a little differently, so the fits agree to the optimiser's tolerance
    np.testing.assert_allclose(clf.loss_curve_[:5], ref.loss_curve_[:5], rtol=1e-9)
    assert clf.objective(X, y) == pytest.approx(ref.objective(X, y), rel=1e-4)
    pred = clf.predict(Xd)
    assert isinstance(pred, da.Array)
    np.testing.assert_array_equal(pred.compute(), ref.predict(X))
    with pytest.raises(ValueError, match="lbfgs"):
        gpuce.SoftmaxClassifier(solver="sgd").fit(Xd, y)


def test_bad_chunking_and_labels():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 8))
    t = rng.integers(0, 8, 40)
    by_class = da.from_array(x, chunks=(20, 4))
    x3 = da.from_array(x.reshape(40, 2, 4), chunks=(20, 1, 2))  # classes in chunks: rows and classes only
    with pytest.raises(ValueError, match=r"chunked along axis 1.*rechunk axis 1 whole"):
        gpuce.softmax_cross_entropy(x3, np.zeros((40, 2), np.int64))
    with pytest.raises(ValueError, match=r"chunked along axis 1.*rechunk"):
        gpuce.softmax(by_class)
    X = da.from_array(rng.standard_normal((40, 6)), chunks=(20, 3))
    with pytest.raises(ValueError, match="feature axis"):
        gpuce.linear_cross_entropy(X, np.ones((8, 6)), t)
    with pytest.raises(ValueError, match="chunk_size"):
        gpuce.linear_cross_entropy(X.rechunk((20, 6)), np.ones((8, 6)), t, chunk_size=0)
    with pytest.raises(ValueError, match="inplace"):
        gpuce.softmax_cross_entropy(da.from_array(x, chunks=(20, 8)), t, return_grad=True, inplace=True)
    unknown = da.from_array(x, chunks=(20, 8))[da.from_array(t, chunks=20) > 3]
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        gpuce.softmax_cross_entropy(unknown, t[t > 3])
    bad = t.copy()
    bad[33] = 8
    loss = gpuce.softmax_cross_entropy(da.from_array(x, chunks=(10, 8)), bad)
    with pytest.raises(ValueError, match=r"label 8 at position \(33,\)"):
        loss.compute(scheduler="sync")


@pytest.mark.gpu
def test_gpu_cupy_chunks():
    """CuPy chunks (what dask-cuda workers hold), run by the synchronous scheduler here."""
    import cupy as cp

    rng = np.random.default_rng(9)
    X, W, y = data(rng, 80, 5, 6, "label", np.float32)
    Xg = split(X).map_blocks(cp.asarray)
    yg = split(y).map_blocks(cp.asarray)
    kw = dict(bias=np.ones(6, np.float32), reg=0.1, return_grad=True)
    loss, g = gpuce.linear_cross_entropy(Xg, cp.asarray(W), yg,
                                         **{**kw, "bias": cp.asarray(kw["bias"])})
    loss, g = dask.compute(loss, g, scheduler="sync")
    assert isinstance(g.W, cp.ndarray) and isinstance(g.X, cp.ndarray)
    want_loss, want = gpuce.linear_cross_entropy(X, W, y, **kw)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    for got_, want_ in zip(g, want):
        np.testing.assert_allclose(cp.asnumpy(got_), want_, rtol=1e-4, atol=1e-5)
    # fit on CuPy chunks with host labels (the README's dask-cuda example)
    from sklearn.datasets import load_digits

    Xd, yd = load_digits(return_X_y=True)
    ref = gpuce.SoftmaxClassifier(reg=1.0, max_iter=30).fit(Xd, yd)
    with dask.config.set(scheduler="sync"):
        clf = gpuce.SoftmaxClassifier(reg=1.0, max_iter=30).fit(
            da.from_array(Xd, chunks=(500, 64)).map_blocks(cp.asarray), da.from_array(yd, chunks=500))
    assert isinstance(clf.coef_, cp.ndarray)
    np.testing.assert_allclose(clf.loss_curve_[:3], ref.loss_curve_[:3], rtol=1e-6)
    sm = gpuce.softmax(Xg).compute(scheduler="sync")
    assert isinstance(sm, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(sm), gpuce.softmax(X), rtol=1e-5, atol=1e-7)


def test_backend_of():
    from gpuce._dispatch import backend_of

    x = np.zeros((2, 2))
    assert backend_of(x) == backend_of(x, None) == backend_of([[1.0]]) == "host"
    assert backend_of(x, da.from_array(x)) == backend_of(da.from_array(x)) == "dask"


def test_classifier_dask_labels_with_host_X():
    """Host X with dask labels is fitted as dask; predictions of a dask X are dask arrays,
    checked for NaN and inf when computed."""
    rng = np.random.default_rng(zlib.crc32(b"classifier host X, dask y"))
    X = rng.standard_normal((60, 4))
    y = np.array(["a", "b", "c"])[np.arange(60) % 3]
    ref = gpuce.SoftmaxClassifier().fit(X, y)
    clf = gpuce.SoftmaxClassifier().fit(X, da.from_array(y, chunks=20))
    np.testing.assert_allclose(clf.loss_curve_[:3], ref.loss_curve_[:3], rtol=1e-9)
    Xd = da.from_array(X, chunks=(25, 4))
    for method in ("predict", "predict_proba", "decision_function"):
        got = getattr(clf, method)(Xd)
        assert isinstance(got, da.Array), method
        want = getattr(clf, method)(X)
        if method == "predict":
            np.testing.assert_array_equal(got.compute(scheduler="sync"), want)
        else:
            np.testing.assert_allclose(got.compute(scheduler="sync"), want, rtol=1e-12)
    assert clf.score(Xd, y) == clf.score(X, y)
    bad = X.copy()
    bad[30, 1] = np.nan
    lazy = clf.predict(da.from_array(bad, chunks=(25, 4)))
    with pytest.raises(ValueError, match="NaN or infinity"):
        lazy.compute(scheduler="sync")


def test_classifier_float16_scores_are_rounded_once_and_the_preconditioner_is_float64():
    """A float16 dask X: the scores X Wᵀ + b are formed in float32 and rounded once (not the
    product rounded, then the sum), and the L-BFGS preconditioner's mean of squares is summed
    in float64 (a float16 sum stalls at 2048), the same as for the in-memory X."""
    from gpuce import classifier as C
    from gpuce._dispatch import DASK

    X = np.full((70000, 2), 3.0, np.float16)
    X[:, 1] = 300
    np.testing.assert_array_equal(C._feature_scale(da.from_array(X, chunks=(7000, 2)), DASK),
                                  C._feature_scale(X, "host"))
    np.testing.assert_array_equal(C._feature_scale(X, "host"), [4.0, 256.0])

    rng = np.random.default_rng(4)
    Xs = rng.standard_normal((300, 6))
    ys = rng.integers(0, 4, 300)
    clf = gpuce.SoftmaxClassifier(reg=1.0).fit(Xs, ys)
    X16 = (Xs * 3).astype(np.float16)
    got = clf.decision_function(da.from_array(X16, chunks=(100, 6))).compute()
    W16, b16 = clf.coef_.astype(np.float16), clf.intercept_.astype(np.float16)
    want = (X16.astype(np.float32) @ W16.astype(np.float32).T + b16.astype(np.float32)).astype(np.float16)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want)
