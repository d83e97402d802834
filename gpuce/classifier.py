"""SoftmaxClassifier: the seed's linear softmax classifier as a scikit-learn-style estimator.

Objective (intercept unpenalised)::

    J(W, b) = Σ_i L_i + λ/2 ‖W‖²,   L_i = lse(W x_i + b) − (W x_i + b)_{y_i}

the same optimum as scikit-learn's ``LogisticRegression(C=1/λ)`` (multinomial).
Data stays where it was passed: CuPy arrays are fitted with the GPU kernels and only
the C × D parameters cross to the host per L-BFGS iteration; ``solver="sgd"`` runs
entirely on the device.  scikit-learn is optional: with it installed the estimator
derives from its BaseEstimator / ClassifierMixin (Pipeline, clone, cross_val_score);
without it the same get_params / set_params / score are provided here.
"""

from __future__ import annotations

import inspect
import time

import numpy as np

from ._backend import array_module, is_cupy_array, is_dask_array
from .linear import linear_cross_entropy
from .softmax import log_softmax, softmax

SOLVERS = ("lbfgs", "sgd")


class _ParamsMixin:
    """get_params / set_params / score with scikit-learn's semantics, for use without it."""

    @classmethod
    def _get_param_names(cls):
        sig = inspect.signature(cls.__init__)
        return sorted(p for p in sig.parameters if p != "self")

    def get_params(self, deep=True):
        return {k: getattr(self, k) for k in self._get_param_names()}

    def set_params(self, **params):
        valid = self._get_param_names()
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"invalid parameter {k!r} for {type(self).__name__}; valid: {valid}")
            setattr(self, k, v)
        return self

    def score(self, X, y, sample_weight=None):
        pred = _to_numpy(self.predict(X))
        y = _to_numpy(y)
        return float(np.average(pred == y, weights=sample_weight))


def _bases():
    try:
        from sklearn.base import BaseEstimator, ClassifierMixin
    except ImportError:
        return (_ParamsMixin,)
    return (ClassifierMixin, BaseEstimator)


def _to_numpy(a):
    return a.get() if is_cupy_array(a) else np.asarray(a)


def _class_index(block, classes):
    """Class indices of a block of labels (a dask map_blocks function; all labels are known)."""
    xp = array_module(block)
    return xp.searchsorted(xp.asarray(classes), block).astype(np.int64)


def _class_of(idx, classes):
    """Labels of a block of class indices."""
    if is_cupy_array(idx) and classes.dtype.kind in "OUS":
        return classes[idx.get()]
    xp = array_module(idx)
    return xp.asarray(classes)[idx]


def _progress(total, verbose, desc):
    """A tqdm bar when verbose and tqdm is installed; else a stub that prints."""
    if not verbose:
        return None
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=True, mininterval=0.5)
    except ImportError:
        return None


class SoftmaxClassifier(*_bases()):
    """Multinomial logistic regression (linear softmax classifier) on NumPy or CuPy data.

    Parameters
    ----------
    reg : float, default 1.0
        λ in ``Σ L_i + λ/2 ‖W‖²`` (scikit-learn's ``C = 1/λ``).
    fit_intercept : bool, default True
        Learn an unpenalised bias per class.
    solver : {"lbfgs", "sgd"}
        "lbfgs": scipy.optimize L-BFGS-B on the objective / N with exact gradients,
        ``tol`` the projected-gradient tolerance.  "sgd": minibatch SGD with momentum on
        the device; stops when the epoch objective fails to improve by ``tol``·|J| for
        5 epochs in a row.
    max_iter : int
        L-BFGS iterations or SGD epochs.
    tol : float
    batch_size : int, optional
        SGD minibatch (default min(256, N)).
    learning_rate, momentum : float
        SGD step on the per-sample objective ``J / N`` and heavy-ball momentum.
    random_state : int, optional
        Seed of the SGD shuffles.
    verbose : int
        > 0 shows progress (a tqdm bar when tqdm is installed).

    Attributes
    ----------
    coef_ : (C, D) array, in the training data's array type
    intercept_ : (C,) array (zeros without fit_intercept)
    classes_ : (C,) array of the labels seen in fit (any sortable values, strings too)
    n_iter_ : int
    loss_curve_ : list of float, J after each iteration / epoch
    n_features_in_ : int
    """

    def __init__(self, reg=1.0, fit_intercept=True, solver="lbfgs", max_iter=500, tol=1e-6,
                 batch_size=None, learning_rate=0.1, momentum=0.9, random_state=None, verbose=0):
        self.reg = reg
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.random_state = random_state
        self.verbose = verbose

    # -- fitting --------------------------------------------------------------------------

    def _check_params(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not (np.isfinite(self.reg) and self.reg >= 0):
            raise ValueError(f"reg must be a finite number >= 0, got {self.reg}")
        if int(self.max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def _check_X(self, X, xp=None):
        if is_dask_array(X):
            from ._dask import _module_of

            xp = _module_of(X)
        else:
            xp = xp or array_module(X)
            X = xp.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
        if X.dtype.kind != "f":
            if X.dtype.kind not in "iub":
                raise TypeError(f"X must be numeric, got {X.dtype}")
            X = X.astype(np.float64)
        return xp, X

    def fit(self, X, y):
        """Fit on X (N, D) and labels y (N,); returns self."""
        self._check_params()
        if is_dask_array(X) or is_dask_array(y):
            xp, X, y_idx, classes = self._prepare_dask(X, y)
        else:
            xp, X, y_idx, classes = self._prepare(X, y)
        self.classes_ = classes
        self.n_features_in_ = X.shape[1]
        n, d = X.shape
        c = classes.shape[0]
        t0 = time.perf_counter()
        if self.solver == "lbfgs":
            W, b, n_iter, curve = self._fit_lbfgs(xp, X, y_idx, c)
        else:
            W, b, n_iter, curve = self._fit_sgd(xp, X, y_idx, c)
        self.fit_time_ = time.perf_counter() - t0
        self.coef_ = W
        self.intercept_ = b if b is not None else xp.zeros(c, X.dtype)
        self.n_iter_ = int(n_iter)
        self.loss_curve_ = curve
        return self

    def _prepare(self, X, y):
        """Checked in-memory X, the labels as class indices and the classes."""
        xp, X = self._check_X(X)
        if X.shape[0] == 0:
            raise ValueError("cannot fit on 0 samples")
        if not bool(xp.isfinite(X).all()):
            raise ValueError("X contains NaN or infinity")
        ymod = xp if is_cupy_array(y) else np
        y = ymod.asarray(y)
        self._check_y(X, y)
        classes, y_idx = ymod.unique(y, return_inverse=True)
        self._check_classes(classes)
        return xp, X, xp.asarray(y_idx.reshape(-1).astype(np.int64)), classes

    def _prepare_dask(self, X, y):
        """The same for dask arrays chunked by rows: one pass for the finiteness check and
        the classes, then X and the class indices persisted (on the workers of a
        distributed cluster) for the optimiser's iterations."""
        import dask
        import dask.array as da

        from ._dask import _align_rows, _as_dask, _module_of, _rows_only

        if self.solver != "lbfgs":
            raise ValueError(f"solver={self.solver!r} needs in-memory arrays; dask arrays are "
                             "fitted with solver='lbfgs'")
        xp, X = self._check_X(_as_dask(X))
        _rows_only(X, "X", what="feature")
        y = _align_rows(y, X, "y")
        self._check_y(X, y)
        if X.shape[0] == 0:
            raise ValueError("cannot fit on 0 samples")
        finite, classes = dask.compute(da.isfinite(X).all(), da.unique(y))
        if not bool(finite):
            raise ValueError("X contains NaN or infinity")
        self._check_classes(classes)
        y_idx = y.map_blocks(_class_index, classes, dtype=np.int64)
        if _module_of(y_idx) is not xp:  # host labels beside CuPy chunks of X
            y_idx = y_idx.map_blocks(xp.asarray, dtype=np.int64, meta=xp.empty(0, np.int64))
        X, y_idx = dask.persist(X, y_idx)
        return xp, X, y_idx, classes

    @staticmethod
    def _check_y(X, y):
        if y.ndim != 1 or y.shape[0] != X.shape[0]:
            raise ValueError(f"y must be 1-D with {X.shape[0]} labels, got shape {y.shape}")

    @staticmethod
    def _check_classes(classes):
        if classes.shape[0] < 2:
            raise ValueError(f"need samples of at least 2 classes, got {classes.shape[0]}")

    def objective(self, X, y):
        """J(coef_, intercept_) = Σ L_i + λ/2 ‖W‖² on (X, y) with the fitted parameters."""
        xp, X = self._check_X(X)
        y_idx = self._encode(xp, y)
        W, b = self._params_for(xp, X.dtype)
        return float(linear_cross_entropy(X, W, y_idx, bias=b if self.fit_intercept else None,
                                          reg=self.reg, reduction="sum"))

    def _fit_lbfgs(self, xp, X, y_idx, c):
        from scipy.optimize import minimize

        n, d = X.shape
        nw = c * d
        fit_b = bool(self.fit_intercept)
        curve = []
        bar = _progress(int(self.max_iter), self.verbose, "lbfgs")

        def unpack(theta):
            W = xp.asarray(theta[:nw].reshape(c, d).astype(X.dtype))
            b = xp.asarray(theta[nw:].astype(X.dtype)) if fit_b else None
            return W, b

        def fun(theta):
            W, b = unpack(theta)
            loss, g = linear_cross_entropy(X, W, y_idx, bias=b, reg=self.reg, reduction="sum",
                                           return_grad=True, input_grad=False, check_finite=False)
            gW, gb = g.W, g.bias
            if is_dask_array(loss):  # one graph: block partials, their tree, the finish
                import dask

                loss, gW, gb = dask.compute(loss, gW, gb)
            grad = [_to_numpy(gW).astype(np.float64).ravel()]
            if fit_b:
                grad.append(_to_numpy(gb).astype(np.float64))
            return float(loss) / n, np.concatenate(grad) / n

        def callback(intermediate_result):
            curve.append(float(intermediate_result.fun) * n)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(objective=f"{curve[-1]:.6g}")
            elif self.verbose:
                print(f"iter {len(curve):4d}  objective {curve[-1]:.8g}")

        theta0 = np.zeros(nw + (c if fit_b else 0))
        res = minimize(fun, theta0, jac=True, method="L-BFGS-B", callback=callback,
                       options=dict(maxiter=int(self.max_iter), gtol=float(self.tol),
                                    ftol=64 * np.finfo(float).eps, maxls=50))
        if bar is not None:
            bar.close()
        W, b = unpack(res.x)
        return W, b, res.nit, curve

    def _fit_sgd(self, xp, X, y_idx, c):
        n, d = X.shape
        dt = X.dtype.type
        rng = np.random.default_rng(self.random_state)
        bs = int(self.batch_size or min(256, n))
        W = xp.zeros((c, d), X.dtype)
        b = xp.zeros(c, X.dtype) if self.fit_intercept else None
        vW = xp.zeros_like(W)
        vb = xp.zeros_like(b) if b is not None else None
        lr, mu, lam = dt(self.learning_rate), dt(self.momentum), float(self.reg)
        curve, best, stall = [], np.inf, 0
        bar = _progress(int(self.max_iter), self.verbose, "sgd")
        epoch = 0
        for epoch in range(1, int(self.max_iter) + 1):
            perm = xp.asarray(rng.permutation(n))
            total = xp.zeros((), np.float64)
            for s in range(0, n, bs):
                idx = perm[s:s + bs]
                m = idx.shape[0]
                loss, g = linear_cross_entropy(X[idx], W, y_idx[idx], bias=b, reduction="sum",
                                               return_grad=True, input_grad=False,
                                               check_finite=False)
                total += loss
                gW = g.W * dt(1.0 / m) + dt(lam / n) * W
                vW *= mu
                vW -= lr * gW
                W += vW
                if b is not None:
                    vb *= mu
                    vb -= lr * (g.bias * dt(1.0 / m))
                    b += vb
            obj = float(total) + 0.5 * lam * float((W.astype(np.float64) ** 2).sum())
            curve.append(obj)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(objective=f"{obj:.6g}")
            elif self.verbose:
                print(f"epoch {epoch:4d}  objective {obj:.8g}")
            if not np.isfinite(obj):
                raise FloatingPointError(
                    f"SGD diverged at epoch {epoch} (objective {obj}); lower learning_rate")
            if obj > best - float(self.tol) * max(1.0, abs(best)):
                stall += 1
                if stall >= 5:
                    break
            else:
                stall = 0
            best = min(best, obj)
        if bar is not None:
            bar.close()
        return W, b, epoch, curve

    # -- prediction -----------------------------------------------------------------------

    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit first")

    def _params_for(self, xp, dtype):
        self._check_fitted()
        conv = (lambda a: xp.asarray(a)) if xp is not np else _to_numpy
        return conv(self.coef_).astype(dtype, copy=False), conv(self.intercept_).astype(dtype, copy=False)

    def _encode(self, xp, y):
        classes = _to_numpy(self.classes_)
        y = _to_numpy(y)
        idx = np.searchsorted(classes, y)
        idx = np.clip(idx, 0, len(classes) - 1)
        if not np.all(classes[idx] == y):
            raise ValueError("y contains labels not seen in fit")
        return xp.asarray(idx.astype(np.int64))

    def decision_function(self, X):
        """Scores X Wᵀ + b, shape (N, C)."""
        self._check_fitted()
        xp, X = self._check_X(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, the model was fitted with {self.n_features_in_}")
        W, b = self._params_for(xp, X.dtype)
        return X @ W.T + b

    def predict_proba(self, X):
        return softmax(self.decision_function(X), axis=-1)

    def predict_log_proba(self, X):
        return log_softmax(self.decision_function(X), axis=-1)

    def predict(self, X):
        scores = self.decision_function(X)
        idx = scores.argmax(axis=1)
        classes = self.classes_
        if is_dask_array(idx):
            return idx.map_blocks(_class_of, classes, dtype=classes.dtype)
        if is_cupy_array(scores) and not is_cupy_array(classes):
            if classes.dtype.kind in "OUS":
                return classes[idx.get()]  # string labels can only live on the host
            classes = array_module(scores).asarray(classes)
        elif not is_cupy_array(scores) and is_cupy_array(classes):
            classes = classes.get()
        return classes[idx]

    def score(self, X, y, sample_weight=None):
        """Mean accuracy of predict(X) against y."""
        return _ParamsMixin.score(self, X, y, sample_weight)
