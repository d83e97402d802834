"""bfloat16 (ml_dtypes) end to end: every public function against the float64 reference on
the same bfloat16 values (upcast to float64 for the reference), the dtype rules (float32
loss, bfloat16 gradients rounded once to nearest even), the narrow types that are refused,
the chunked linear model's float32 dW accumulation, dask chunks and the classifier.  The
torch adapter's bfloat16 tests are in test_torch_bfloat16.py."""

import itertools
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gpuce
import reference as R
from helpers import BFLOAT16, LOSS_TOL, TOL, rng_for, to_numpy
from gpuce import _blas

BF = BFLOAT16
F32 = np.dtype(np.float32)
# half an ulp of bfloat16 (8 significant bits): the relative error of one rounding to nearest
UNIT = 2.0**-9


def bf16(a):
    return np.asarray(a, np.float64).astype(BF)


def up(a):
    """The float64 values of an array (bfloat16 upcast exactly)."""
    return np.asarray(to_numpy(a)).astype(np.float64)


def make(rng, shape, kind, ignore_frac=0.2):
    c = shape[-1]
    x = bf16(rng.standard_normal(shape) * 3)
    if kind == "label":
        t = rng.integers(0, c, size=shape[:-1])
        t[rng.random(shape[:-1]) < ignore_frac] = -100
    else:
        p = rng.random(shape)
        t = bf16(p / p.sum(-1, keepdims=True))
    return x, t


def reference(x, t, kind, weight=None, **kw):
    c = x.shape[-1]
    t2 = t.reshape(-1) if kind == "label" else up(t).reshape(-1, c)
    loss, grad = R.sce(up(x).reshape(-1, c), t2, kind=kind,
                       weight=None if weight is None else up(weight), **kw)
    if kw.get("reduction") == "none":
        loss = loss.reshape(x.shape[:-1])
    return loss, grad.reshape(x.shape)


def check(xp, x, t, kind, weight=None, **kw):
    """gpuce on bfloat16 logits against the float64 reference: float32 loss within float32's
    tolerance, bfloat16 gradient within one bfloat16 ulp; the caller's arrays untouched."""
    ref_loss, ref_grad = reference(x, t, kind, weight=weight, **kw)
    xd, td = xp.asarray(x), xp.asarray(t)
    wd = None if weight is None else xp.asarray(weight)
    before = (to_numpy(xd).copy(), to_numpy(td).copy())
    loss, grad = gpuce.softmax_cross_entropy(xd, td, weight=wd, return_grad=True, **kw)
    assert loss.dtype == F32 and grad.dtype == BF and grad.shape == x.shape
    assert type(grad) is type(xd)
    np.testing.assert_array_equal(up(xd), up(before[0]))
    np.testing.assert_array_equal(up(td), up(before[1]))
    lr, la = LOSS_TOL[BF]
    np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=lr, atol=la * 10)
    gr, ga = TOL[BF]
    scale = max(1.0, float(np.nanmax(np.abs(ref_grad))) if ref_grad.size else 1.0)
    np.testing.assert_allclose(up(grad), ref_grad, rtol=gr, atol=ga * scale)
    return loss, grad


OPTIONS = list(itertools.product(["mean", "sum", "none"], [False, True], [0.0, 0.1], [0.0, 1e-3]))


@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("reduction,weighted,smoothing,z", OPTIONS)
def test_every_option(xp, kind, reduction, weighted, smoothing, z):
    rng = rng_for("bf16 every option", kind, reduction, weighted, smoothing, z)
    x, t = make(rng, (37, 11), kind)
    weight = bf16(rng.random(11) + 0.5) if weighted else None
    check(xp, x, t, kind, weight=weight, reduction=reduction, label_smoothing=smoothing,
          z_loss=z)


def test_ignore_index_inside_range_and_int32_labels(xp):
    rng = rng_for("bf16 ignore_index")
    x, t = make(rng, (40, 9), "label", ignore_frac=0)
    t = t.astype(np.int32)
    t[::3] = 4  # an ignore_index that is also a class
    weight = bf16(rng.random(9) + 0.5)
    for reduction in ("mean", "none"):
        check(xp, x, t, "label", weight=weight, ignore_index=4, reduction=reduction,
              label_smoothing=0.2)


def test_gradient_is_rounded_once_to_nearest_even():
    """The bfloat16 gradient is exactly the float32 gradient (of the same logits, upcast)
    rounded to nearest even: the float16 rule."""
    rng = rng_for("bf16 rounding")
    x, t = make(rng, (64, 33), "label")
    for kw in ({}, dict(label_smoothing=0.1, z_loss=1e-3, reduction="sum")):
        l16, g16 = gpuce.softmax_cross_entropy(x, t, return_grad=True, **kw)
        l32, g32 = gpuce.softmax_cross_entropy(x.astype(F32), t, return_grad=True, **kw)
        np.testing.assert_array_equal(g16.view(np.uint16), g32.astype(BF).view(np.uint16))
        np.testing.assert_array_equal(l16, l32)


def test_round_to_nearest_even_on_ties():
    """softmax of [0, log 3] is (1/4, 3/4): exact.  With a third class the outputs are
    ties or not; whichever they are, bfloat16's result equals ml_dtypes' RNE of float32."""
    x = bf16([[0.0, 0.0], [0.0, np.log(3.0)], [1.0, 2.0]])
    y = gpuce.softmax(x)
    expect = gpuce.softmax(x.astype(F32)).astype(BF)
    np.testing.assert_array_equal(y.view(np.uint16), expect.view(np.uint16))
    # a float32 value exactly halfway between two bfloat16 neighbours rounds to the even one
    half = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8], F32).astype(BF).astype(np.float64)
    np.testing.assert_array_equal(half, [1.0, 1 + 2.0**-6])


def test_inplace(xp):
    rng = rng_for("bf16 inplace")
    x, t = make(rng, (20, 9), "label")
    _, want = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), return_grad=True)
    xd = xp.asarray(x.copy())
    loss, g = gpuce.softmax_cross_entropy(xd, xp.asarray(t), return_grad=True, inplace=True)
    assert g is xd and loss.dtype == F32
    np.testing.assert_array_equal(up(xd), up(want))


ADVERSARIAL = [
    [-1000.0, 1.0, 0.0],
    [1e4, -1e4, 0.0],
    [3.0, 3.0, 3.0],  # ties
    [-np.inf, 2.0, 1.0],
    [88.0, 89.0, 90.0],
    [-1e4, -1e4 + 64, -1e4 + 128],
    [3e38, -3e38, 0.0],  # near bfloat16's (float32's) largest
    [1e-38, 2e-38, 0.0],  # tiny
    [np.nan, 0.0, 1.0],
    [np.inf, 0.0, 1.0],
    [-np.inf, -np.inf, -np.inf],
]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_adversarial_rows(xp, reduction):
    x = bf16(ADVERSARIAL)
    t = np.array([1, 0, 2, 1, 0, 2, 2, 0, 0, 1, 2])  # row 6: loss 3e38, finite in float32
    check(xp, x, t, "label", reduction=reduction)
    loss, grad = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), reduction="none",
                                             return_grad=True)
    bad = np.array([R.bad_row(r) for r in up(x)])
    assert np.isnan(up(loss)[bad]).all() and np.isfinite(up(loss)[~bad]).all()
    assert np.isnan(up(grad)[bad]).all() and np.isfinite(up(grad)[~bad]).all()


def test_all_ignored_and_empty(xp):
    x = bf16(np.arange(12.0).reshape(4, 3))
    loss, grad = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(np.full(4, -100)),
                                             return_grad=True)
    assert float(loss) == 0.0 and loss.dtype == F32
    assert grad.dtype == BF and not up(grad).any()
    for reduction in ("none", "sum", "mean"):
        loss, grad = gpuce.softmax_cross_entropy(xp.asarray(np.zeros((0, 5), BF)),
                                                 xp.asarray(np.zeros(0, np.int64)),
                                                 reduction=reduction, return_grad=True)
        assert loss.dtype == F32 and grad.dtype == BF and grad.shape == (0, 5)
        assert loss.shape == ((0,) if reduction == "none" else ())


def test_odd_shape_and_strided(xp):
    rng = rng_for("bf16 odd")
    x, t = make(rng, (9, 7, 41), "label")
    check(xp, x, t, "label", reduction="mean", label_smoothing=0.1)
    # leading dimensions without an (N, C) view: the walked path
    check(xp, x.transpose(1, 0, 2), t.T, "label", reduction="sum")


def test_mixed_target_dtypes_are_read_in_float32(xp):
    """The documented rule: a probability target of another float dtype than the logits is
    read in the accumulation dtype (float32 here), exactly: float16 targets with bfloat16
    logits give the result of the same targets as float32, not rounded to bfloat16."""
    rng = rng_for("bf16 mixed")
    x, _ = make(rng, (16, 10), "prob")
    p = rng.random((16, 10))
    p16 = (p / p.sum(-1, keepdims=True)).astype(np.float16)
    a, ga = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(p16), return_grad=True)
    b, gb = gpuce.softmax_cross_entropy(xp.asarray(x), xp.asarray(p16.astype(F32)),
                                        return_grad=True)
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    np.testing.assert_array_equal(up(ga), up(gb))
    check(xp, x, p16, "prob")
    # and the other way round: bfloat16 targets with float16 logits
    lo, go = gpuce.softmax_cross_entropy(xp.asarray(x.astype(np.float16)), xp.asarray(bf16(p)),
                                         return_grad=True)
    assert lo.dtype == F32 and go.dtype == np.float16


# ---- hypothesis properties (test_sce.py's and test_information.py's, in bfloat16) ------------

bf16_rows = hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1,
                                                    max_side=12),
                       elements=st.floats(-50, 50)).map(bf16)


@settings(max_examples=60, deadline=None)
@given(x=bf16_rows, data=st.data())
def test_gradient_is_softmax_minus_onehot(x, data):
    n, c = x.shape
    t = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    _, grad = gpuce.softmax_cross_entropy(x, t, reduction="sum", return_grad=True)
    expect = R.softmax_rows(up(x))
    expect[np.arange(n), t] -= 1.0
    rtol, atol = TOL[BF]
    np.testing.assert_allclose(up(grad), expect, rtol=rtol, atol=atol)


@settings(max_examples=60, deadline=None)
@given(x=bf16_rows, shift=st.integers(-8, 8))
def test_shift_invariance(x, shift):
    """Shifting by a power of two's multiple that keeps every value exact in bfloat16."""
    n, c = x.shape
    t = np.arange(n) % c
    s = float(shift) * 64.0
    xs = up(x) + s
    assume_exact = np.array_equal(bf16(xs).astype(np.float64), xs)
    if not assume_exact:  # the shifted row is not representable: compare with its rounding
        xs = bf16(xs).astype(np.float64)
    a = gpuce.softmax_cross_entropy(x, t, reduction="none")
    b = gpuce.softmax_cross_entropy(bf16(xs), t, reduction="none")
    ra, _ = R.sce(up(x), t, kind="label", reduction="none")
    rb, _ = R.sce(xs, t, kind="label", reduction="none")
    rtol, atol = LOSS_TOL[BF]
    np.testing.assert_allclose(a, ra, rtol=rtol, atol=atol * 10)
    np.testing.assert_allclose(b, rb, rtol=rtol, atol=atol * 10)
    if assume_exact:
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * 10)


@settings(max_examples=60, deadline=None)
@given(x=bf16_rows)
def test_label_and_onehot_targets_agree(x):
    n, c = x.shape
    t = np.arange(n) % c
    onehot = np.eye(c)[t].astype(BF)
    a, ga = gpuce.softmax_cross_entropy(x, t, label_smoothing=0.1, return_grad=True)
    b, gb = gpuce.softmax_cross_entropy(x, onehot, label_smoothing=0.1, return_grad=True)
    rtol, atol = LOSS_TOL[BF]
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    rtol, atol = TOL[BF]
    np.testing.assert_allclose(up(ga), up(gb), rtol=rtol, atol=atol)


probs = hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 9)),
                   elements=st.floats(0.0, 1.0)).map(bf16)


@settings(max_examples=60, deadline=None)
@given(p=probs, data=st.data())
def test_information_decomposition(p, data):
    q = data.draw(hnp.arrays(np.float64, p.shape, elements=st.floats(1e-3, 1.0))).astype(BF)
    h, hx, kl = gpuce.entropy(p), gpuce.cross_entropy(p, q), gpuce.kl_div(p, q)
    assert h.dtype == hx.dtype == kl.dtype == F32
    np.testing.assert_allclose(hx, h + kl, rtol=1e-5, atol=1e-5)


# ---- softmax family and information measures -------------------------------------------------

@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_family(xp, axis):
    rng = rng_for("bf16 softmax", axis)
    x = bf16(rng.standard_normal((23, 17)) * 4)
    x[3] = bf16([-np.inf] * 17)
    x[5, 2] = np.inf
    x64 = up(x)
    rtol, atol = TOL[BF]
    with np.errstate(all="ignore"):
        for fn, ref in ((gpuce.softmax, scipy.special.softmax),
                        (gpuce.log_softmax, scipy.special.log_softmax),
                        (gpuce.logsumexp, scipy.special.logsumexp)):
            got = fn(xp.asarray(x), axis=axis)
            assert got.dtype == BF
            # the float32 result rounded once, special rows (NaN conventions) included
            np.testing.assert_array_equal(up(got), up(fn(xp.asarray(x.astype(F32)), axis=axis)
                                                      .astype(BF)))
            # against scipy on the rows (columns for axis 0) without infinities
            keep = np.isfinite(x64).all(axis=axis)
            want = ref(x64, axis=axis)
            sel = (lambda a: a[keep]) if axis != 0 or fn is gpuce.logsumexp else (
                lambda a: a[:, keep])
            np.testing.assert_allclose(sel(up(got)), sel(want), rtol=rtol, atol=atol)


def test_information_against_scipy(xp):
    rng = rng_for("bf16 information")
    p = rng.random((8, 13))
    p[0, :4] = 0
    p = bf16(p / p.sum(-1, keepdims=True))
    q = rng.random((8, 13))
    q = bf16(q / q.sum(-1, keepdims=True))
    p64, q64 = up(p), up(q)
    for fn, want in ((gpuce.entropy, scipy.special.entr(p64).sum(-1)),
                     (gpuce.kl_div, scipy.special.rel_entr(p64, q64).sum(-1)),
                     (gpuce.cross_entropy, (scipy.special.entr(p64)
                                            + scipy.special.rel_entr(p64, q64)).sum(-1))):
        args = (p,) if fn is gpuce.entropy else (p, q)
        got = fn(*(xp.asarray(a) for a in args))
        assert got.dtype == F32
        np.testing.assert_allclose(to_numpy(got), want, rtol=1e-5, atol=1e-6)
    # p in bfloat16, q in float16: both read in float32
    got = gpuce.kl_div(xp.asarray(p), xp.asarray(q.astype(np.float16)))
    want = scipy.special.rel_entr(p64, q64.astype(np.float16).astype(np.float64)).sum(-1)
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-5, atol=1e-6)


# ---- narrow types -------------------------------------------------------------------------------

NARROW = ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
          "float8_e3m4", "float4_e2m1fn", "float6_e2m3fn", "float8_e8m0fnu", "int4"]


@pytest.mark.parametrize("name", NARROW)
def test_narrow_types_raise_naming_the_dtype(name):
    if not hasattr(ml_dtypes, name):
        pytest.fail(f"ml_dtypes {ml_dtypes.__version__} lacks {name}")  # pinned by pyproject
    dt = np.dtype(getattr(ml_dtypes, name))
    x = np.zeros((3, 4), dt)
    good = np.zeros((3, 4), np.float32)
    calls = [
        lambda: gpuce.softmax_cross_entropy(x, np.zeros(3, np.int64)),
        lambda: gpuce.softmax_cross_entropy(good, x),
        lambda: gpuce.softmax_cross_entropy(good, np.zeros(3, np.int64),
                                            weight=np.zeros(4, dt)),
        lambda: gpuce.softmax(x),
        lambda: gpuce.logsumexp(x),
        lambda: gpuce.entropy(x),
        lambda: gpuce.kl_div(good, x),
        lambda: gpuce.linear_cross_entropy(x, np.zeros((2, 4), dt), np.zeros(3, np.int64)),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=dt.name):
            call()


# ---- the chunked linear model ------------------------------------------------------------------

def linear_data(rng, n=37, d=16, c=11, kind="label"):
    X = bf16(rng.standard_normal((n, d)))
    W = bf16(0.5 * rng.standard_normal((c, d)))
    b = bf16(rng.standard_normal(c))
    if kind == "label":
        y = rng.integers(0, c, n)
        y[::7] = -100
    else:
        p = rng.random((n, c))
        y = bf16(p / p.sum(-1, keepdims=True))
    return X, W, b, y


def linear_reference(X, W, b, y, kind, reg, reduction, weight=None, **kw):
    X64, W64 = up(X), up(W)
    f = X64 @ W64.T + (0 if b is None else up(b))
    t = y if kind == "label" else up(y)
    loss, G = R.sce(f, t, kind=kind, reduction=reduction,
                    weight=None if weight is None else up(weight), **kw)
    if reduction != "none":
        loss = loss + 0.5 * reg * (W64**2).sum()
    return f, loss, G @ W64, G.T @ X64 + reg * W64, G.sum(0)


@pytest.mark.parametrize("kind", ["label", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_linear_against_reference(xp, kind, reduction, chunk_size):
    """The logits X Wᵀ + b are rounded to bfloat16 (as torch's F.linear): each logit moves by
    at most UNIT·|f|.  A logit's move δ changes L_i by at most Σ_j |∂L_i/∂f_ij| |δ_j| ≤
    2 UNIT max|f| (Σ_j |q_j - t_j| ≤ 2) per unit of weight, which bounds the loss's error;
    the gradients carry that through q (≤ 2 UNIT max|f| relative), plus the roundings of G
    and of the output, 2 UNIT: gradients within (2 + 2 max|f|) UNIT of their largest entry."""
    rng = rng_for("bf16 linear", kind, reduction, chunk_size)
    X, W, b, y = linear_data(rng, kind=kind)
    weight = bf16(rng.random(11) + 0.5)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    if kind == "label":
        kw["weight"] = weight
    X_before = X.copy()
    loss, g = gpuce.linear_cross_entropy(*(xp.asarray(v) for v in (X, W, y)), bias=xp.asarray(b),
                                         reg=0.1, return_grad=True, chunk_size=chunk_size,
                                         **{k: (xp.asarray(v) if k == "weight" else v)
                                            for k, v in kw.items()})
    np.testing.assert_array_equal(X.view(np.uint16), X_before.view(np.uint16))
    assert loss.dtype == F32
    assert g.X.dtype == g.W.dtype == g.bias.dtype == BF
    f, rl, rdX, rdW, rdb = linear_reference(X, W, b, y, kind, 0.1, **kw)
    fmax = float(np.abs(f).max())
    if reduction == "none":
        w_rows = np.ones(len(f))
    else:
        w_rows = np.full(len(f), 1.0 if reduction == "sum" else 1.0 / max(1, (y != -100).sum()))
    loss_bound = 2 * UNIT * fmax * (2.0 if kind == "label" else 1.0)  # weights <= 1.5, + z
    err = np.abs(to_numpy(loss).astype(np.float64) - rl)
    assert np.all(err <= loss_bound * (w_rows if reduction == "none" else w_rows.sum()) + 1e-5)
    grad_rel = (2 + 2 * fmax) * UNIT
    for got, want in ((g.X, rdX), (g.W, rdW), (g.bias, rdb)):
        np.testing.assert_allclose(up(got), want, rtol=0, atol=grad_rel * np.abs(want).max())


def test_linear_chunking_changes_nothing_but_rounding():
    """dW accumulates over the chunks in float32 and is rounded once: one-row chunks give
    dW within one bfloat16 ulp of the single chunk's (with bfloat16 accumulation the 37
    roundings would add up)."""
    rng = rng_for("bf16 linear chunks")
    X, W, b, y = linear_data(rng, n=200)
    one = gpuce.linear_cross_entropy(X, W, y, bias=b, reg=0.5, return_grad=True,
                                     chunk_size=200)
    many = gpuce.linear_cross_entropy(X, W, y, bias=b, reg=0.5, return_grad=True, chunk_size=1)
    np.testing.assert_allclose(many[0], one[0], rtol=1e-6)
    for a, c in zip(many[1], one[1]):
        np.testing.assert_allclose(up(a), up(c), rtol=2.0**-8, atol=1e-30)
    # and closer to float64's dW than 200 bfloat16 roundings would be
    _, _, _, rdW, _ = linear_reference(X, W, b, y, "label", 0.5, "mean")
    # the logits' and G's roundings (no accumulation error): the bound of the test above
    err = np.abs(up(many[1].W) - rdW).max() / np.abs(rdW).max()
    assert err < 2.0**-7, err


def test_linear_never_copies_X_to_float32():
    """The float32 products run per chunk: the peak host memory of a bfloat16 run with small
    chunks stays below dX (one X-sized bfloat16 output) plus half a float32 copy of X."""
    rng = rng_for("bf16 linear memory")
    n, d, c = 20000, 64, 8
    X = bf16(rng.standard_normal((n, d)))
    W = bf16(rng.standard_normal((c, d)) * 0.1)
    y = rng.integers(0, c, n)
    # warm-up: the first call imports scipy's BLAS modules, whose allocations would count
    gpuce.linear_cross_entropy(X[:2], W, y[:2], return_grad=True, chunk_size=1)
    tracemalloc.start()
    try:
        gpuce.linear_cross_entropy(X, W, y, return_grad=True, chunk_size=500)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    dX_bytes = X.nbytes
    assert peak < dX_bytes + X.nbytes, (peak, X.nbytes)  # a float32 copy is 2 * X.nbytes


def test_gemm_numpy_bfloat16():
    rng = rng_for("bf16 gemm")
    A, B = bf16(rng.standard_normal((9, 5))), bf16(rng.standard_normal((7, 5)))
    want = up(A) @ up(B).T
    out = np.zeros((9, 7), BF)
    _blas.gemm(np, "N", "T", A, B, out, 1.0, 0.0)
    np.testing.assert_array_equal(out.view(np.uint16),
                                  (A.astype(F32) @ B.astype(F32).T).astype(BF).view(np.uint16))
    acc = np.ones((9, 7), F32)
    _blas.gemm(np, "N", "T", A, B, acc, 2.0, 1.0)  # float32 out: accumulated in float32
    np.testing.assert_allclose(acc, 1 + 2 * want, rtol=1e-6)
    with pytest.raises(TypeError, match="float32"):
        _blas.gemm(np, "N", "T", A, B, np.zeros((9, 7), np.float64))
    with pytest.raises(TypeError, match="one dtype"):
        _blas.gemm(np, "N", "T", A, B.astype(F32), acc)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float32"])
def test_gemm_cupy_bfloat16_gemmex(out_dtype):
    """cublasGemmEx with CUDA_R_16BF storage and float32 compute, into bfloat16 or float32."""
    import cupy as cp

    rng = rng_for("bf16 gemm gpu", out_dtype)
    A, B = bf16(rng.standard_normal((65, 33))), bf16(rng.standard_normal((17, 33)))
    out0 = bf16(rng.standard_normal((65, 17)))
    out = cp.asarray(out0.astype(out_dtype))
    _blas.gemm(cp, "N", "T", cp.asarray(A), cp.asarray(B), out, 0.5, 1.0)
    want = 0.5 * (up(A) @ up(B).T) + up(out0)
    tol = 2.0**-8 if out_dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(up(out), want, rtol=tol, atol=tol * np.abs(want).max())


# ---- dask and the classifier --------------------------------------------------------------------

def test_dask_bfloat16_chunks():
    da = pytest.importorskip("dask.array")
    rng = rng_for("bf16 dask")
    x, t = make(rng, (80, 13), "label")
    xd = da.from_array(x, chunks=((13, 40, 1, 26), (13,)))
    td = da.from_array(t, chunks=((13, 40, 1, 26),))
    for reduction in ("mean", "none"):
        loss, grad = gpuce.softmax_cross_entropy(xd, td, reduction=reduction, return_grad=True,
                                                 label_smoothing=0.1)
        assert grad.dtype == BF and loss.dtype == F32
        loss, grad = loss.compute(scheduler="sync"), grad.compute(scheduler="sync")
        assert grad.dtype == BF
        want_l, want_g = gpuce.softmax_cross_entropy(x, t, reduction=reduction,
                                                     return_grad=True, label_smoothing=0.1)
        np.testing.assert_allclose(loss, want_l, rtol=1e-6)
        # both round the float32 gradient once (the blocks keep it in float32 until scaled)
        np.testing.assert_allclose(up(grad), up(want_g), rtol=2.0**-8, atol=1e-30)
    sm = gpuce.softmax(xd).compute(scheduler="sync")
    assert sm.dtype == BF
    np.testing.assert_array_equal(sm.view(np.uint16), gpuce.softmax(x).view(np.uint16))
    X, W, b, y = linear_data(rng, n=80)
    Xd = da.from_array(X, chunks=((13, 40, 1, 26), (16,)))
    yd = da.from_array(y, chunks=((13, 40, 1, 26),))
    loss, g = gpuce.linear_cross_entropy(Xd, W, yd, bias=b, reg=0.1, return_grad=True)
    import dask

    loss, dX, dW, db = dask.compute(loss, g.X, g.W, g.bias, scheduler="sync")
    want = gpuce.linear_cross_entropy(X, W, y, bias=b, reg=0.1, return_grad=True)
    assert dX.dtype == dW.dtype == db.dtype == BF and loss.dtype == F32
    np.testing.assert_allclose(loss, want[0], rtol=1e-6)
    for a, c in zip((dX, dW, db), want[1]):
        np.testing.assert_allclose(up(a), up(c), rtol=2.0**-8, atol=1e-30)


def test_classifier_fits_bfloat16_X_in_float32():
    rng = rng_for("bf16 classifier")
    n, d, c = 300, 6, 3
    centers = rng.standard_normal((c, d)) * 2
    y = rng.integers(0, c, n)
    X = bf16(centers[y] + rng.standard_normal((n, d)))
    clf = gpuce.SoftmaxClassifier(reg=1.0).fit(X, y)
    ref = gpuce.SoftmaxClassifier(reg=1.0).fit(X.astype(F32), y)
    assert clf.coef_.dtype == F32
    np.testing.assert_array_equal(clf.coef_, ref.coef_)
    np.testing.assert_array_equal(clf.predict_proba(X), ref.predict_proba(X.astype(F32)))
    assert clf.score(X, y) > 0.8
    da = pytest.importorskip("dask.array")
    fits = [gpuce.SoftmaxClassifier(reg=1.0).fit(da.from_array(v, chunks=(100, d)),
                                                 da.from_array(y, chunks=100))
            for v in (X, X.astype(F32))]
    assert fits[0].coef_.dtype == F32
    np.testing.assert_array_equal(np.asarray(fits[0].coef_), np.asarray(fits[1].coef_))


def test_dask_local_cluster_bfloat16():
    """bfloat16 blocks and the float32 partials cross process boundaries (2 worker
    processes): the same results as the single-array path."""
    da = pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    import dask

    rng = rng_for("bf16 dask cluster")
    X, W, b, y = linear_data(rng, n=60)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, worker_dashboard_address=None)
    with cluster, distributed.Client(cluster):
        Xd = da.from_array(X, chunks=((20, 40), (16,)))
        yd = da.from_array(y, chunks=((20, 40),))
        loss, g = gpuce.linear_cross_entropy(Xd, W, yd, bias=b, reg=0.1, return_grad=True)
        loss, dX, dW, db = dask.compute(loss, g.X, g.W, g.bias)
    want = gpuce.linear_cross_entropy(X, W, y, bias=b, reg=0.1, return_grad=True)
    assert dX.dtype == dW.dtype == db.dtype == BF and loss.dtype == F32
    np.testing.assert_allclose(loss, want[0], rtol=1e-6)
    for a, c in zip((dX, dW, db), want[1]):
        np.testing.assert_allclose(up(a), up(c), rtol=2.0**-8, atol=1e-30)
