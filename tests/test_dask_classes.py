"""Logits chunked along the class axis (and the rows): softmax_cross_entropy combines each
row's partial statistics over its class chunks (gpuce._partials) and equals the single-array
call for every option; the partials' combine itself against the whole row, for any split."""

import numpy as np
import pytest

import gpuce
from gpuce import _partials as P
from gpuce._validation import sce_args
from helpers import rng_for

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

SPLITS = [(23,), (5, 1, 0, 11, 6), (1,) * 23, (12, 11)]


def problem(rng, kind, n=11, c=23):
    f = rng.normal(size=(n, c)) * 3
    f[1, 4] = -np.inf
    f[2] = -np.inf
    f[3, 5] = np.nan
    f[6, 7] = np.inf
    f[7, 2:9] = 50.0  # ties at the maximum, across chunks
    if kind == "label":
        y = rng.integers(0, c, n)
        y[4] = -100
        y[7] = 5
    else:
        y = rng.dirichlet(np.ones(c), n)
        y[5, 3] = 0.0
    return f, y


def equal(a, b, rtol=1e-12, atol=1e-13):
    if a is None or b is None:
        assert a is None and b is None
        return
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol,
                               atol=atol, equal_nan=True)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("cap", [None, 4.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_partials_combine_equals_whole_rows(split, kind, cap, weighted):
    """Partials of any class split, combined in order, give the whole-row loss and gradient
    (the NumPy path's, float64) and the predicted class (the first maximum)."""
    rng = rng_for("partials", split, kind, cap, weighted)
    f, y = problem(rng, kind)
    w = rng.uniform(0.2, 2.0, 23) if weighted else None
    opts = dict(weight=w, label_smoothing=0.1, z_loss=0.01, softcap=cap)
    want, want_g, want_st = gpuce.softmax_cross_entropy(f, y, reduction="none", return_grad=True,
                                                        return_stats=True, **opts)
    args = sce_args(f, y, reduction="none", ignore_index=-100, return_grad=True, inplace=False,
                    **opts)
    cuts = np.concatenate([[0], np.cumsum(split)]).astype(int)
    lab = y if kind == "label" else None

    def block(a, b):
        return dict(labels=lab, y=None if lab is not None else y[:, a:b],
                    weight=None if w is None else w[a:b])

    parts = [P.block_partials(np, f[:, a:b], a, args, **block(a, b))
             for a, b in zip(cuts[:-1], cuts[1:])]
    comb = P.combine(np, parts, np.float64)
    rows = P.row_terms(np, comb, args, labels=lab)
    equal(rows["loss"], want)
    equal(rows["lse"], want_st.lse)
    np.testing.assert_array_equal(comb["imax"], want_st.predicted)
    g = np.concatenate([P.block_grad(np, f[:, a:b], a, args, rows, 1.0, **block(a, b))
                        for a, b in zip(cuts[:-1], cuts[1:])], axis=1)
    equal(g, want_g, rtol=1e-11)
    # the combine is a fixed function of the partials: the same list gives the same bits
    again = P.combine(np, [dict(p) for p in parts], np.float64)
    for key in comb:
        np.testing.assert_array_equal(comb[key], again[key])


@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunks", [(4, 7), (11, 5), ((3, 8), (20, 3))])
def test_class_chunked_equals_numpy(kind, reduction, weighted, chunks):
    rng = rng_for("dask-classes", kind, reduction, weighted, chunks)
    f, y = problem(rng, kind)
    w = rng.uniform(0.2, 2.0, 23) if weighted else None
    opts = dict(reduction=reduction, weight=w, label_smoothing=0.1, z_loss=0.01, softcap=4.0,
                return_grad=True, return_stats=True)
    want = gpuce.softmax_cross_entropy(f, y, **opts)
    fd = da.from_array(f, chunks=chunks)
    yd = da.from_array(y, chunks=chunks if kind == "prob" else (chunks[0],))
    got = gpuce.softmax_cross_entropy(fd, yd, **opts)
    assert isinstance(got[0], da.Array) and isinstance(got[1], da.Array)
    got = dask.compute(*got)
    equal(got[0], want[0])
    equal(got[1], want[1], rtol=1e-11)
    for a, b in zip(got[2], want[2]):
        equal(a, b)


def test_class_chunked_leading_dims_and_bfloat16():
    import ml_dtypes

    rng = rng_for("dask-classes-3d")
    f = (rng.normal(size=(6, 3, 40)) * 3).astype(ml_dtypes.bfloat16)
    y = rng.integers(0, 40, (6, 3))
    y[2, 1] = -100
    want_l, want_g = gpuce.softmax_cross_entropy(f, y, return_grad=True)
    got_l, got_g = dask.compute(*gpuce.softmax_cross_entropy(
        da.from_array(f, chunks=(4, 3, 16)), y, return_grad=True))
    assert got_l.dtype == np.float32 and got_g.dtype == f.dtype
    equal(got_l, want_l, rtol=1e-6, atol=1e-7)
    # each gradient element is the float32 value rounded once; the float32 values may differ
    # in the last bits (another summation order), so they round to the same or a neighbour
    diff = np.abs(got_g.astype(np.float64) - want_g.astype(np.float64))
    assert (diff <= 2.0**-7 * np.abs(want_g.astype(np.float64)) + 1e-7).all()


def test_class_chunked_errors():
    rng = rng_for("dask-classes-errors")
    f = rng.normal(size=(8, 10))
    y = rng.integers(0, 10, 8)
    y[6] = 12
    loss = gpuce.softmax_cross_entropy(da.from_array(f, chunks=(4, 5)), y)
    with pytest.raises(ValueError, match=r"label 12 at position \(6,\)"):
        loss.compute()
    with pytest.raises(ValueError, match="shape"):
        gpuce.softmax_cross_entropy(da.from_array(f, chunks=(4, 5)), np.ones((8, 9)) / 9)
    with pytest.raises(ValueError, match="inplace"):
        gpuce.softmax_cross_entropy(da.from_array(f, chunks=(4, 5)), y, return_grad=True,
                                    inplace=True)


def test_class_chunked_on_a_local_cluster():
    distributed = pytest.importorskip("distributed")
    rng = rng_for("dask-classes-cluster")
    f, y = problem(rng, "label", n=40, c=30)
    w = rng.uniform(0.5, 1.5, 30)
    want = gpuce.softmax_cross_entropy(f, y, weight=w, return_grad=True, z_loss=0.1)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, worker_dashboard_address=None)
    with distributed.Client(cluster):
        got = gpuce.softmax_cross_entropy(da.from_array(f, chunks=(15, 12)), y, weight=w,
                                          return_grad=True, z_loss=0.1)
        got = dask.compute(*got)
    cluster.close()
    equal(got[0], want[0])
    equal(got[1], want[1], rtol=1e-11)


# -- linear_cross_entropy with W chunked by classes ---------------------------------------------

def linear_problem(rng, kind, n=30, d=5, c=41):
    X = rng.normal(size=(n, d))
    W = rng.normal(size=(c, d))
    b = rng.normal(size=c)
    if kind == "label":
        y = rng.integers(0, c, n)
        y[3] = -100
    else:
        y = rng.dirichlet(np.ones(c), n)
    return X, W, b, y


@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("x_chunks", [11, None])
def test_linear_w_chunked_by_classes_equals_numpy(kind, reduction, x_chunks):
    rng = rng_for("dask-linear-classes", kind, reduction, x_chunks)
    X, W, b, y = linear_problem(rng, kind)
    w = rng.uniform(0.5, 2.0, 41)
    opts = dict(bias=b, reg=0.0 if reduction == "none" else 0.3, reduction=reduction, weight=w,
                label_smoothing=0.1, z_loss=0.01, softcap=4.0, return_grad=True,
                return_stats=True, chunk_size=7)
    want = gpuce.linear_cross_entropy(X, W, y, **opts)
    Xd = X if x_chunks is None else da.from_array(X, chunks=(x_chunks, 5))
    got = gpuce.linear_cross_entropy(Xd, da.from_array(W, chunks=(15, 5)), y, **opts)
    assert isinstance(got[0], da.Array) and isinstance(got[1].W, da.Array)
    got = dask.compute(*got)
    equal(got[0], want[0], rtol=1e-12, atol=1e-12)
    for a, b_ in zip(got[1], want[1]):
        equal(a, b_, rtol=1e-11, atol=1e-13)
    for a, b_ in zip(got[2], want[2]):
        equal(a, b_)


def test_linear_w_chunked_bfloat16_and_input_grad():
    import ml_dtypes

    rng = rng_for("dask-linear-classes-bf16")
    X, W, b, y = linear_problem(rng, "label", n=24, d=8, c=50)
    X, W = X.astype(ml_dtypes.bfloat16), W.astype(ml_dtypes.bfloat16)
    want_l, want_g = gpuce.linear_cross_entropy(X, W, y, return_grad=True, input_grad=False)
    got_l, got_g = dask.compute(*gpuce.linear_cross_entropy(
        da.from_array(X, chunks=(8, 8)), da.from_array(W, chunks=(20, 8)), y, return_grad=True,
        input_grad=False))
    assert got_g.X is None and got_g.W.dtype == W.dtype
    equal(got_l, want_l, rtol=1e-6, atol=1e-7)
    diff = np.abs(got_g.W.astype(np.float64) - want_g.W.astype(np.float64))
    assert (diff <= 2.0**-7 * np.abs(want_g.W.astype(np.float64)) + 1e-6).all()


def test_linear_w_chunked_errors():
    rng = rng_for("dask-linear-classes-errors")
    X, W, b, y = linear_problem(rng, "label")
    with pytest.raises(ValueError, match="feature axis"):
        gpuce.linear_cross_entropy(X, da.from_array(W, chunks=(15, 2)), y)
    Wn = W.copy()
    Wn[20, 1] = np.nan
    with pytest.raises(ValueError, match="W contains NaN"):
        gpuce.linear_cross_entropy(X, da.from_array(Wn, chunks=(15, 5)), y)
    bad = y.copy()
    bad[7] = 41
    loss = gpuce.linear_cross_entropy(X, da.from_array(W, chunks=(15, 5)), bad)
    with pytest.raises(ValueError, match=r"label 41 at position \(7,\)"):
        loss.compute()
