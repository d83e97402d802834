"""SoftmaxClassifier: objective parity with scikit-learn, estimator conventions, solvers."""

import numpy as np
import pytest

import gpuce
from helpers import to_numpy

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import cross_val_score, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, test_size=0.25, stratify=y, random_state=0)


def objective(X, y, W, b, lam):
    """Σ_i L_i + λ/2 ‖W‖² in float64, written out here (independent of gpuce)."""
    f = X @ W.T + (0 if b is None else b)
    m = f.max(1, keepdims=True)
    lse = (m + np.log(np.exp(f - m).sum(1, keepdims=True)))[:, 0]
    return float((lse - f[np.arange(len(y)), y]).sum() + 0.5 * lam * (W ** 2).sum())


def test_objective_parity_with_sklearn(xp, digits):
    Xtr, Xte, ytr, yte = digits
    lam = 0.1
    ours = gpuce.SoftmaxClassifier(reg=lam, fit_intercept=False, tol=1e-10, max_iter=5000)
    ours.fit(xp.asarray(Xtr), xp.asarray(ytr))
    ref = LogisticRegression(C=1 / lam, fit_intercept=False, tol=1e-10, max_iter=10000).fit(Xtr, ytr)
    j_ours = objective(Xtr, ytr, to_numpy(ours.coef_), None, lam)
    j_ref = objective(Xtr, ytr, ref.coef_, None, lam)
    assert abs(j_ours - j_ref) <= 1e-6 * abs(j_ref)
    assert j_ours == pytest.approx(ours.objective(xp.asarray(Xtr), xp.asarray(ytr)), rel=1e-10)
    acc_ours = ours.score(xp.asarray(Xte), xp.asarray(yte))
    assert abs(acc_ours - ref.score(Xte, yte)) <= 0.01
    assert type(ours.coef_) is type(xp.asarray(Xtr))


def test_intercept_parity(digits):
    Xtr, _, ytr, _ = digits
    ours = gpuce.SoftmaxClassifier(reg=1.0, tol=1e-10, max_iter=5000).fit(Xtr, ytr)
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(Xtr, ytr)
    j_ours = objective(Xtr, ytr, ours.coef_, ours.intercept_, 1.0)
    j_ref = objective(Xtr, ytr, ref.coef_, ref.intercept_, 1.0)
    assert abs(j_ours - j_ref) <= 1e-6 * abs(j_ref)


def test_sgd_reaches_a_good_solution(xp, digits):
    Xtr, Xte, ytr, yte = digits
    lbfgs = gpuce.SoftmaxClassifier(reg=0.1).fit(Xtr, ytr)
    sgd = gpuce.SoftmaxClassifier(reg=0.1, solver="sgd", max_iter=100, learning_rate=1.0,
                                  batch_size=128, random_state=0)
    sgd.fit(xp.asarray(Xtr), xp.asarray(ytr))
    j_best = lbfgs.objective(Xtr, ytr)
    assert sgd.objective(Xtr, ytr) <= 1.2 * j_best
    assert sgd.score(xp.asarray(Xte), xp.asarray(yte)) >= lbfgs.score(Xte, yte) - 0.03
    assert len(sgd.loss_curve_) == sgd.n_iter_ and sgd.loss_curve_[-1] < sgd.loss_curve_[0]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # few iterations on purpose
def test_estimator_conventions(digits):
    Xtr, Xte, ytr, yte = digits
    est = gpuce.SoftmaxClassifier(reg=0.5, max_iter=50, verbose=0)
    params = est.get_params()
    assert params["reg"] == 0.5 and params["solver"] == "lbfgs"
    est2 = clone(est)
    assert est2.get_params() == params and est2 is not est
    est2.set_params(reg=2.0)
    assert est2.reg == 2.0 and est.reg == 0.5
    with pytest.raises(ValueError):
        est2.set_params(nonsense=1)
    assert est.fit(Xtr, ytr) is est
    proba = est.predict_proba(Xte)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.exp(est.predict_log_proba(Xte)), proba, rtol=1e-10)
    assert est.coef_.shape == (10, 64) and est.intercept_.shape == (10,)
    assert est.n_iter_ >= 1 and len(est.loss_curve_) == est.n_iter_
    np.testing.assert_array_equal(est.predict(Xte), est.classes_[est.decision_function(Xte).argmax(1)])


def test_string_labels():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(-2, 1, (30, 2)), rng.normal(2, 1, (30, 2)), rng.normal((2, -4), 1, (30, 2))])
    y = np.array(["cat"] * 30 + ["dog"] * 30 + ["eel"] * 30)
    est = gpuce.SoftmaxClassifier(reg=0.1).fit(X, y)
    assert list(est.classes_) == ["cat", "dog", "eel"]
    assert est.predict(X).dtype.kind == "U"
    assert est.score(X, y) > 0.9


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # few iterations on purpose
def test_pipeline_and_cross_val_score(digits):
    Xtr, _, ytr, _ = digits
    pipe = make_pipeline(StandardScaler(), gpuce.SoftmaxClassifier(reg=1.0, max_iter=100))
    scores = cross_val_score(pipe, Xtr, ytr, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.85


def test_bad_parameters_and_data():
    X, y = np.random.default_rng(1).normal(size=(10, 3)), np.arange(10) % 2
    with pytest.raises(ValueError, match="solver"):
        gpuce.SoftmaxClassifier(solver="adam").fit(X, y)
    with pytest.raises(ValueError, match="reg"):
        gpuce.SoftmaxClassifier(reg=-1).fit(X, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        gpuce.SoftmaxClassifier().fit(X, np.zeros(10))
    Xn = X.copy()
    Xn[0, 0] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        gpuce.SoftmaxClassifier().fit(Xn, y)
    with pytest.raises(ValueError, match=r"inconsistent numbers of samples: \[10, 5\]"):
        gpuce.SoftmaxClassifier().fit(X, y[:5])
    with pytest.raises(NotFittedError, match="not fitted"):
        gpuce.SoftmaxClassifier().predict(X)
    est = gpuce.SoftmaxClassifier().fit(X, y)
    with pytest.raises(ValueError, match="features"):
        est.predict(X[:, :2])


def test_backend_is_decided_by_the_dispatch_layer(monkeypatch):
    """The classifier never asks "is this a dask array?" itself: gpuce._dispatch.backend_of
    decides, and the dask case goes to its form in gpuce._dask."""
    import ast
    from pathlib import Path

    import gpuce._dask as D
    from gpuce import classifier

    tree = ast.parse(Path(classifier.__file__).read_text(encoding="utf-8"))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "is_dask_array" not in names and "backend_of" in names
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m == "dask" or m.startswith("dask.") for m in imported)

    da = pytest.importorskip("dask.array")
    X, y = np.random.default_rng(4).normal(size=(12, 3)), np.arange(12) % 3
    seen = []

    def prepare(est, X_, y_):
        seen.append((type(X_), type(y_)))
        raise RuntimeError("the dask form")

    monkeypatch.setattr(D, "classifier_prepare", prepare)
    for Xa, ya in [(da.from_array(X, chunks=6), y), (X, da.from_array(y, chunks=6))]:
        with pytest.raises(RuntimeError, match="the dask form"):
            gpuce.SoftmaxClassifier().fit(Xa, ya)
    assert len(seen) == 2
    gpuce.SoftmaxClassifier().fit(X, y)  # in memory: not the dask form
    assert len(seen) == 2


@pytest.mark.parametrize("reg", [0.1, 1.0])
def test_lbfgs_on_standardised_digits_converges_like_sklearn(reg):
    """The preconditioner (feature rms rounded to a power of two) leaves standardised data as
    they are: at the defaults, no warning, and the loss curve reaches scikit-learn's final
    objective within 1.5x its iteration count (iterations are deterministic; the times are in
    bench/bench_linear.py)."""
    import warnings

    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    sk = LogisticRegression(C=1 / reg, max_iter=10000).fit(X, y)
    j_sk = float(gpuce.linear_cross_entropy(X, sk.coef_, y, bias=sk.intercept_, reg=reg,
                                            reduction="sum"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ConvergenceWarning fails the test
        clf = gpuce.SoftmaxClassifier(reg=reg).fit(X, y)
    reach = next(i + 1 for i, j in enumerate(clf.loss_curve_) if j <= j_sk * (1 + 1e-12))
    assert reach <= 1.5 * int(np.max(sk.n_iter_)), (reach, sk.n_iter_)
    assert clf.objective(X, y) <= j_sk
