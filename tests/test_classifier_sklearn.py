"""SoftmaxClassifier as a scikit-learn estimator: every check_estimator check, input
validation, binary problems, scipy.sparse, honest convergence, the fallback without
scikit-learn.

References are independent of gpuce: scikit-learn's LogisticRegression and roc_auc_score,
the dense fit for the sparse one, closed forms written here.
"""

import subprocess
import sys
import textwrap
import warnings
import zlib

import numpy as np
import pytest

import gpuce
import gpuce.classifier as gc

sklearn = pytest.importorskip("sklearn")
import scipy.sparse as sp  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, DataConversionWarning, NotFittedError  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import StratifiedKFold, cross_val_score  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

SoftmaxClassifier = gpuce.SoftmaxClassifier


def rng_for(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


def blobs(name, n=90, d=4, c=3, sep=2.0):
    """Overlapping Gaussian classes (not separable, so the unregularised optimum exists)."""
    rng = rng_for(name)
    y = np.arange(n) % c
    centers = rng.normal(0, sep, (c, d))
    return centers[y] + rng.normal(size=(n, d)), y


@pytest.fixture(params=["sklearn", "fallback"])
def helpers(request, monkeypatch):
    """Run a test with scikit-learn's validation helpers and with gpuce's own checks (the
    path CuPy and dask inputs take, and every input without scikit-learn)."""
    if request.param == "fallback":
        monkeypatch.setattr(gc, "_SK", None)
    return request.param


# -- every check of scikit-learn's check_estimator, one test id each ----------------------

# the default, no intercept, and SGD (its default learning_rate=0.1 diverges on the checks'
# features of mean 100, and fit raises FloatingPointError as it should)
@parametrize_with_checks([SoftmaxClassifier(), SoftmaxClassifier(fit_intercept=False),
                          SoftmaxClassifier(solver="sgd", learning_rate=1e-3, max_iter=200)])
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_sklearn_check(estimator, check):
    check(estimator)


# -- validation ---------------------------------------------------------------------------

def test_not_fitted(helpers):
    X, _ = blobs("not fitted")
    for method in ("predict", "predict_proba", "predict_log_proba", "decision_function"):
        with pytest.raises(NotFittedError, match="not fitted"):
            getattr(SoftmaxClassifier(), method)(X)


def test_bad_X_rejected(helpers):
    X, y = blobs("bad X")
    cases = {
        "complex": (X + 1j, "[Cc]omplex"),
        "words": (np.where(X > 0, "up", "down").astype(object), "float|number"),
        "no rows": (X[:0], "0 sample|at least 1 sample"),
        "no columns": (X[:, :0], "0 feature|at least 1 sample and 1 feature"),
        "1-D": (X[:, 0], "Reshape your data"),
        "3-D": (X[:, :, None], "dim|2-D"),
    }
    for what, (bad, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            SoftmaxClassifier().fit(bad, y[: len(bad)])
            pytest.fail(f"X with {what} accepted")
    for value in (np.nan, np.inf, -np.inf):
        bad = X.copy()
        bad[5, 2] = value
        with pytest.raises(ValueError, match="NaN|infinity"):
            SoftmaxClassifier().fit(bad, y)


def test_object_numbers_and_ints_are_converted(helpers):
    X, y = blobs("object numbers")
    ref = SoftmaxClassifier().fit(X, y)
    got = SoftmaxClassifier().fit(X.astype(object), y)
    np.testing.assert_array_equal(got.coef_, ref.coef_)
    Xi = np.round(X * 10).astype(np.int32)
    np.testing.assert_array_equal(SoftmaxClassifier().fit(Xi, y).coef_,
                                  SoftmaxClassifier().fit(Xi.astype(np.float64), y).coef_)


def test_predict_rejects_non_finite_and_wrong_width(helpers):
    X, y = blobs("predict nan")
    est = SoftmaxClassifier().fit(X, y)
    for value in (np.nan, np.inf):
        bad = X[:7].copy()
        bad[3, 1] = value
        for method in ("predict", "predict_proba", "decision_function"):
            with pytest.raises(ValueError, match="NaN|infinity"):
                getattr(est, method)(bad)
    with pytest.raises(ValueError, match="3 features, but SoftmaxClassifier is expecting 4"):
        est.predict(X[:, :3])
    assert est.n_features_in_ == 4


def test_bad_labels_rejected(helpers):
    X, y = blobs("bad labels")
    yf = y.astype(np.float64)
    nan_y = yf.copy()
    nan_y[4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SoftmaxClassifier().fit(X, nan_y)
    inf_y = yf.copy()
    inf_y[4] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        SoftmaxClassifier().fit(X, inf_y)
    with pytest.raises(ValueError, match="continuous"):
        SoftmaxClassifier().fit(X, yf + 0.5 * (np.arange(len(y)) % 2))
    with pytest.raises(ValueError, match="one class"):
        SoftmaxClassifier().fit(X, np.full(len(y), 3))
    with pytest.raises(ValueError, match="one class"):  # one sample is one class
        SoftmaxClassifier().fit(X[:1], y[:1])
    with pytest.raises(ValueError, match="y is None"):
        SoftmaxClassifier().fit(X, None)
    with pytest.raises(ValueError):
        SoftmaxClassifier().fit(X, np.stack([y, y], axis=1))
    # integral floats are labels: the same fit as the integers
    np.testing.assert_array_equal(SoftmaxClassifier().fit(X, yf).coef_,
                                  SoftmaxClassifier().fit(X, y).coef_)


def test_column_vector_y_warns_and_is_raveled(helpers):
    X, y = blobs("column y")
    ref = SoftmaxClassifier().fit(X, y)
    with pytest.warns(DataConversionWarning):
        est = SoftmaxClassifier().fit(X, y[:, None])
    np.testing.assert_array_equal(est.coef_, ref.coef_)
    np.testing.assert_array_equal(est.predict(X), ref.predict(X))


BAD_PARAMS = [
    ("max_iter", 1.5), ("max_iter", 0), ("max_iter", True), ("max_iter", "10"),
    ("reg", -1.0), ("reg", np.nan), ("reg", np.inf), ("reg", "1"),
    ("solver", "adam"), ("solver", None),
    ("tol", -1e-3), ("tol", np.nan),
    ("batch_size", 0), ("batch_size", 2.5),
    ("learning_rate", 0.0), ("learning_rate", -0.1), ("learning_rate", np.inf),
    ("momentum", 1.0), ("momentum", -0.1),
    ("fit_intercept", "yes"), ("random_state", -1), ("random_state", "seed"), ("verbose", -1),
]


@pytest.mark.parametrize("name,value", BAD_PARAMS)
def test_bad_parameters_raise_at_fit(name, value):
    X, y = blobs("bad params")
    est = SoftmaxClassifier(**{name: value})  # __init__ stores, never validates
    assert est.get_params()[name] is value
    with pytest.raises(gc.InvalidParameterError, match=f"^{name} must be .*got {value!r}"):
        est.fit(X, y)
    assert issubclass(gc.InvalidParameterError, ValueError)
    assert issubclass(gc.InvalidParameterError, TypeError)


def test_good_parameter_types_accepted():
    X, y = blobs("good params")
    ref = SoftmaxClassifier(max_iter=40, reg=0.5).fit(X, y)
    est = SoftmaxClassifier(max_iter=np.int64(40), reg=np.float32(0.5), fit_intercept=np.True_,
                            random_state=np.random.RandomState(0)).fit(X, y)
    np.testing.assert_allclose(est.coef_, ref.coef_, rtol=1e-12)
    kw = dict(solver="sgd", max_iter=5, batch_size=np.int32(16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = SoftmaxClassifier(random_state=np.random.default_rng(1), **kw).fit(X, y)
        b = SoftmaxClassifier(random_state=1, **kw).fit(X, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)  # a Generator seeds as its seed does


# -- binary problems ----------------------------------------------------------------------

def test_binary_decision_function_is_log_odds(helpers):
    X, y = blobs("binary log-odds", c=2)
    labels = np.array(["no", "yes"])[y]
    est = SoftmaxClassifier(reg=0.3).fit(X, labels)
    f = est.decision_function(X)
    assert f.shape == (len(X),)
    p = est.predict_proba(X)
    assert p.shape == (len(X), 2)
    # the log-odds of classes_[1], computed here from the parameters
    want = X @ (est.coef_[1] - est.coef_[0]) + (est.intercept_[1] - est.intercept_[0])
    np.testing.assert_allclose(f, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f, np.log(p[:, 1] / p[:, 0]), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(est.predict(X), est.classes_[(f > 0).astype(int)])
    # multiclass keeps (N, C)
    X3, y3 = blobs("binary log-odds 3")
    assert SoftmaxClassifier().fit(X3, y3).decision_function(X3).shape == (len(X3), 3)


def test_binary_matches_logistic_regression():
    """Two classes, reg λ: the loss depends on w = W_1 − W_0 only, so the optimum has
    W_1 = −W_0 = w/2 and λ/2 ‖W‖² = λ/4 ‖w‖²: the binary logistic optimum with C = 2/λ."""
    X, y = blobs("binary vs logistic", n=200, c=2, sep=1.0)
    lam = 0.7
    est = SoftmaxClassifier(reg=lam, tol=1e-10, max_iter=1000).fit(X, y)
    ref = LogisticRegression(C=2 / lam, tol=1e-12, max_iter=10000).fit(X, y)
    np.testing.assert_allclose(est.coef_[1] - est.coef_[0], ref.coef_[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(est.decision_function(X), ref.decision_function(X), rtol=1e-5,
                               atol=1e-6)


def test_cross_val_score_roc_auc():
    X, y = blobs("roc auc", n=150, c=2, sep=0.8)
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    got = cross_val_score(SoftmaxClassifier(), X, y, cv=cv, scoring="roc_auc")
    assert got.shape == (3,) and np.isfinite(got).all()
    # reg=1 is C = 2 for two classes (see test_binary_matches_logistic_regression)
    want = []
    for tr, te in cv.split(X, y):
        ref = LogisticRegression(C=2.0, tol=1e-10).fit(X[tr], y[tr])
        want.append(roc_auc_score(y[te], ref.decision_function(X[te])))
    np.testing.assert_allclose(got, want, atol=1e-3)


# -- scipy.sparse: accepted, fitted through sparse products, never densified --------------

@pytest.fixture
def no_densify(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("a sparse X was densified")

    for cls in (sp.csr_matrix, sp.csr_array, sp.csc_matrix, sp.csc_array, sp.coo_matrix, sp.coo_array):
        monkeypatch.setattr(cls, "toarray", refuse)
        monkeypatch.setattr(cls, "todense", refuse)


@pytest.mark.parametrize("fmt", ["csr_matrix", "csc_array", "coo_matrix"])
def test_sparse_equals_dense(helpers, fmt, monkeypatch, no_densify):
    rng = rng_for("sparse " + fmt)
    X, y = blobs("sparse " + fmt, n=120, d=30, c=4)
    X[rng.random(X.shape) < 0.8] = 0.0
    ref = SoftmaxClassifier(reg=0.5, tol=1e-9).fit(X, y)
    monkeypatch.setattr(gc, "SPARSE_BLOCK_ELEMENTS", 4 * 25)  # blocks of 25 rows: 5 blocks
    Xs = getattr(sp, fmt)(X)
    est = SoftmaxClassifier(reg=0.5, tol=1e-9).fit(Xs, y)
    np.testing.assert_allclose(est.coef_, ref.coef_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(est.intercept_, ref.intercept_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(est.predict_proba(Xs), ref.predict_proba(X), rtol=1e-6, atol=1e-9)
    assert est.objective(Xs, y) == pytest.approx(ref.objective(X, y), rel=1e-10)
    sgd_kw = dict(solver="sgd", reg=0.5, batch_size=16, max_iter=20, random_state=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sgd_ref = SoftmaxClassifier(**sgd_kw).fit(X, y)
        sgd = SoftmaxClassifier(**sgd_kw).fit(Xs, y)
    np.testing.assert_allclose(sgd.coef_, sgd_ref.coef_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sgd.loss_curve_, sgd_ref.loss_curve_, rtol=1e-10)


def test_sparse_not_densified(no_densify):
    X, y = blobs("sparse no densify", n=60, d=200, c=3)
    X[np.abs(X) < 1.5] = 0.0
    Xs = sp.csr_array(X)
    est = SoftmaxClassifier().fit(Xs, y)
    assert est.predict(Xs).shape == (60,)
    assert est.predict_proba(Xs).shape == (60, 3)


def test_sparse_nan_rejected(helpers):
    X, y = blobs("sparse nan")
    X[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SoftmaxClassifier().fit(sp.csr_matrix(X), y)


# -- honest convergence -------------------------------------------------------------------

def test_lbfgs_warns_at_max_iter():
    X, y = blobs("lbfgs max_iter", n=200, d=8, c=4)
    with pytest.warns(ConvergenceWarning, match="max_iter=3"):
        est = SoftmaxClassifier(max_iter=3).fit(X, y)
    assert est.n_iter_ == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = SoftmaxClassifier(max_iter=500).fit(X, y)
    assert 3 < est.n_iter_ < 500


def test_sgd_warns_at_max_iter():
    X, y = blobs("sgd max_iter", n=200, d=8, c=4)
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        est = SoftmaxClassifier(solver="sgd", max_iter=2, random_state=0).fit(X, y)
    assert est.n_iter_ == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = SoftmaxClassifier(solver="sgd", max_iter=2000, tol=1e-3, random_state=0).fit(X, y)
    assert est.n_iter_ < 2000


@pytest.mark.parametrize("lr,scale", [(1e6, 1.0), (0.1, 1e150)])
def test_sgd_divergence_raises(lr, scale):
    X, y = blobs("sgd diverges")
    with pytest.raises(FloatingPointError, match=f"diverged.*learning_rate \\(now {lr!r}\\)"):
        SoftmaxClassifier(solver="sgd", learning_rate=lr, random_state=0).fit(X * scale, y)


def test_features_of_magnitude_1e150_are_fitted():
    """Unscaled, the gradient at 0 is ~1e150 while J ≤ N log C: L-BFGS's first line search
    can never meet its sufficient-decrease test and returned the zeros after 0 iterations.
    With the feature-scale preconditioning the fit is the one of X with W scaled by 1e-150;
    λ/2 ‖W‖² is then ~1e-300, so the optimum is the unregularised one."""
    X, y = blobs("1e150", n=120, c=2, sep=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = SoftmaxClassifier(reg=1.0, tol=1e-10).fit(X * 1e150, y)
    assert est.n_iter_ > 0 and np.abs(est.coef_).max() > 0
    ref = LogisticRegression(C=1e12, tol=1e-12, max_iter=10000).fit(X, y)  # unregularised
    np.testing.assert_allclose((est.coef_[1] - est.coef_[0]) * 1e150, ref.coef_[0], rtol=1e-4)
    np.testing.assert_array_equal(est.predict(X * 1e150), ref.predict(X))
    # and the preconditioning leaves ordinary fits where they were
    X3, y3 = blobs("1e150 multiclass")
    a = SoftmaxClassifier(reg=0.1, tol=1e-10).fit(X3, y3)
    b = SoftmaxClassifier(reg=0.1e6, tol=1e-10).fit(X3 * 1e3, y3)  # λ‖W‖² invariant
    np.testing.assert_allclose(b.coef_ * 1e3, a.coef_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b.intercept_, a.intercept_, rtol=1e-4, atol=1e-6)


def test_lbfgs_tol_holds_for_the_gradient_in_W():
    """Columns spread over five decades: preconditioned, the stopping test must still be
    about ∂(J/N)/∂W (checked here from the formula (Pᵀ − Yᵀ) X + λW), not about the
    gradient in the scaled variables, which is smaller by s_j (a 1e-3 gradient passed)."""
    rng = rng_for("scaled columns")
    n, d, c = 300, 10, 3
    y = np.arange(n) % c
    X = (rng.normal(0, 1.5, (c, d))[y] + rng.normal(size=(n, d))) * np.logspace(-2, 3, d)
    est = SoftmaxClassifier(reg=1.0, tol=1e-6).fit(X, y)
    f = X @ est.coef_.T + est.intercept_
    P = np.exp(f - f.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    P[np.arange(n), y] -= 1
    assert np.abs((P.T @ X + est.coef_) / n).max() < 1e-4
    assert np.abs(P.sum(0) / n).max() < 1e-4


# -- dask (in-process scheduler): gpuce's checks, lazily where predict is lazy ------------

def test_dask_binary_and_bad_inputs():
    da = pytest.importorskip("dask.array")
    import dask

    X, y = blobs("dask binary", n=120, c=2, sep=1.0)
    Xd, yd = da.from_array(X, chunks=(40, 4)), da.from_array(y, chunks=40)
    with dask.config.set(scheduler="sync"):
        ref = SoftmaxClassifier(reg=0.5).fit(X, y)
        est = SoftmaxClassifier(reg=0.5).fit(Xd, yd)
        f = est.decision_function(Xd)
        assert isinstance(f, da.Array) and f.shape == (120,)
        np.testing.assert_allclose(f.compute(), ref.decision_function(X), rtol=1e-5, atol=1e-6)
        bad = X.copy()
        bad[70, 0] = np.nan
        pred = est.predict(da.from_array(bad, chunks=(40, 4)))  # lazy: raises when computed
        with pytest.raises(ValueError, match="NaN or infinity"):
            pred.compute()
        with pytest.raises(ValueError, match="NaN or infinity"):
            SoftmaxClassifier().fit(da.from_array(bad, chunks=(40, 4)), yd)
        with pytest.raises(ValueError, match="continuous"):
            SoftmaxClassifier().fit(Xd, yd + 0.25)
        with pytest.raises(ValueError, match="Complex"):
            SoftmaxClassifier().fit(Xd + 1j, yd)
        with pytest.raises(NotFittedError):
            SoftmaxClassifier().predict(Xd)


# -- without scikit-learn -----------------------------------------------------------------

def test_works_without_sklearn():
    """A fresh interpreter where ``import sklearn`` fails: the estimator imports, fits,
    predicts and validates with its own classes."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["sklearn"] = None  # import sklearn -> ImportError
        import numpy as np
        import gpuce.classifier as gc
        from gpuce import SoftmaxClassifier
        assert gc._SK is None and SoftmaxClassifier.__mro__[1] is gc._ParamsMixin
        assert gc.ConvergenceWarning.__module__ == "gpuce.classifier"
        assert issubclass(gc.ConvergenceWarning, UserWarning)
        assert issubclass(gc.NotFittedError, ValueError) and issubclass(gc.NotFittedError, AttributeError)
        rng = np.random.default_rng(5)
        y = np.arange(60) % 2
        X = rng.normal(size=(60, 3)) + 2.0 * y[:, None]
        try:
            SoftmaxClassifier().predict(X)
        except gc.NotFittedError:
            pass
        else:
            raise SystemExit("no NotFittedError")
        est = SoftmaxClassifier(reg=0.5).set_params(max_iter=1)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            est.fit(X, y)
        assert any(issubclass(x.category, gc.ConvergenceWarning) for x in w), w
        est.set_params(max_iter=200).fit(X, y)
        assert est.get_params()["max_iter"] == 200
        assert est.decision_function(X).shape == (60,)
        assert est.score(X, y) > 0.9
        for bad in (X + 1j, X[:0], np.where(X > 3, np.nan, X)):
            try:
                SoftmaxClassifier().fit(bad, y[:len(bad)])
            except ValueError:
                pass
            else:
                raise SystemExit("accepted bad X")
        try:
            SoftmaxClassifier(max_iter=1.5).fit(X, y)
        except ValueError as e:
            assert "max_iter" in str(e)
        else:
            raise SystemExit("max_iter=1.5 accepted")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.strip() == "ok"


# -- the same rules on every backend (CuPy inputs take gpuce's own checks) ----------------

def test_validation_on_backend(xp):
    from helpers import to_numpy

    X, y = blobs("backend validation", c=2)
    Xb, yb = xp.asarray(X), xp.asarray(y)
    with pytest.raises(NotFittedError):
        SoftmaxClassifier().predict(Xb)
    with pytest.raises(ValueError, match="[Cc]omplex"):
        SoftmaxClassifier().fit(Xb + 1j, yb)
    with pytest.raises(ValueError, match="continuous"):
        SoftmaxClassifier().fit(Xb, yb + 0.5)
    nan_y = xp.asarray(y.astype(np.float64))
    nan_y[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SoftmaxClassifier().fit(Xb, nan_y)
    with pytest.raises(ValueError, match="0 sample|at least 1 sample"):
        SoftmaxClassifier().fit(Xb[:0], yb[:0])
    with pytest.raises(ValueError, match="Reshape your data"):
        SoftmaxClassifier().fit(Xb[:, 0], yb)
    with pytest.warns(DataConversionWarning):
        est = SoftmaxClassifier(reg=0.5).fit(Xb, yb[:, None])
    ref = SoftmaxClassifier(reg=0.5).fit(X, y)
    assert type(est.coef_) is type(Xb)
    f = est.decision_function(Xb)
    assert type(f) is type(Xb) and f.shape == (len(X),)
    np.testing.assert_allclose(to_numpy(f), ref.decision_function(X), rtol=1e-6, atol=1e-9)
    bad = Xb.copy()
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="NaN|infinity"):
        est.predict(bad)
    with pytest.raises(ValueError, match="features"):
        est.predict(Xb[:, :2])
    with pytest.raises(FloatingPointError, match="learning_rate"):
        SoftmaxClassifier(solver="sgd", learning_rate=1e6, random_state=0).fit(Xb, yb)
