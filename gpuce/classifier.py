"""SoftmaxClassifier: the linear softmax classifier as a scikit-learn estimator.

Objective (intercept unpenalised)::

    J(W, b) = Σ_i L_i + λ/2 ‖W‖²,   L_i = lse(W x_i + b) − (W x_i + b)_{y_i}

the same optimum as scikit-learn's ``LogisticRegression(C=1/λ)`` for three or more classes
(``C=2/λ`` for two, where scikit-learn fits the single vector W_1 − W_0).
Data stays where it was passed: CuPy arrays are fitted with the GPU kernels and only
the C × D parameters cross to the host per L-BFGS iteration; ``solver="sgd"`` runs
entirely on the device; dask arrays chunked by rows are fitted block by block
(:mod:`gpuce._dask`); scipy.sparse matrices are fitted a block of rows at a time through
sparse products, never densified.

scikit-learn is optional.  With it installed the estimator derives from its
BaseEstimator / ClassifierMixin (Pipeline, clone, cross_val_score, ``check_estimator``
passes) and host inputs (NumPy, lists, pandas, scipy.sparse) go through scikit-learn's own
``validate_data``, ``check_is_fitted`` and ``check_classification_targets``; CuPy and dask
inputs are never handed to them (they would be copied to NumPy) and take gpuce's checks,
which enforce the same rules.  Without scikit-learn the same get_params / set_params /
score and those checks are provided here, and :class:`NotFittedError`,
:class:`ConvergenceWarning` and :class:`DataConversionWarning` are gpuce's own classes
(scikit-learn's when it is installed).
"""

from __future__ import annotations

import inspect
import math
import numbers
import time
import warnings

import numpy as np
from scipy.sparse import issparse

from . import _dask
from ._backend import array_module, float64_accumulator, is_cupy_array, to_backend, to_host
from ._dispatch import CUPY, DASK, HOST, backend_of
from ._validation import acc_dtype, is_bfloat16
from .linear import linear_cross_entropy
from .sce import softmax_cross_entropy
from .softmax import log_softmax, softmax

SOLVERS = ("lbfgs", "sgd")

# SGD stops with FloatingPointError when an epoch's objective exceeds this multiple of the
# objective at zero parameters (N log C): a per-sample loss of 1000 log C nats is no
# longer an optimisation in progress.
DIVERGENCE_FACTOR = 1e3

# rows per block when X is scipy.sparse: the block's logits are at most this many elements
SPARSE_BLOCK_ELEMENTS = 1 << 22

try:
    from sklearn.exceptions import ConvergenceWarning, DataConversionWarning, NotFittedError
except ImportError:
    class NotFittedError(ValueError, AttributeError):
        """predict / decision_function called before fit (scikit-learn's when installed)."""

    class ConvergenceWarning(UserWarning):
        """The optimiser stopped at max_iter or could not make progress."""

    class DataConversionWarning(UserWarning):
        """An input was converted: a column-vector y was raveled."""


class InvalidParameterError(ValueError, TypeError):
    """A constructor parameter has the wrong type or value (raised by fit).

    A ValueError and a TypeError, as scikit-learn's own InvalidParameterError is.
    """


def _sklearn_helpers():
    """scikit-learn's validation helpers, or None without scikit-learn (>= 1.6)."""
    try:
        from sklearn.utils.multiclass import check_classification_targets
        from sklearn.utils.validation import check_is_fitted, validate_data
    except ImportError:
        return None
    return {"validate_data": validate_data, "check_is_fitted": check_is_fitted,
            "check_classification_targets": check_classification_targets}


# None: gpuce's own checks only (also what tests patch in to exercise the fallback)
_SK = _sklearn_helpers()


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
        pred = to_host(self.predict(X))
        y = to_host(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.ravel()
        return float(np.average(pred == y, weights=sample_weight))


def _bases():
    try:
        from sklearn.base import BaseEstimator, ClassifierMixin
    except ImportError:
        return (_ParamsMixin,)
    return (ClassifierMixin, BaseEstimator)


def _is_sparse(X) -> bool:
    return issparse(X)


def _bfloat16_as_float32(X):
    """bfloat16 X (NumPy, CuPy or dask) as float32, exactly; anything else as it came.

    The solvers need gradients far finer than bfloat16's 8 mantissa bits (L-BFGS's line
    search and the tol test would stall on bfloat16 rounding), so a bfloat16 X is fitted and
    predicted in float32: one float32 copy of X (dask: block by block, lazily)."""
    dtype = getattr(X, "dtype", None)
    if dtype is None or not is_bfloat16(dtype):
        return X
    return X.astype(np.float32)


def _progress(total, verbose, desc):
    """A tqdm bar when verbose and tqdm is installed; else a stub that prints."""
    if not verbose:
        return None
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=True, mininterval=0.5)
    except ImportError:
        return None


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _param(name, value, ok, expected):
    if not ok:
        raise InvalidParameterError(f"{name} must be {expected}, got {value!r}")


# rows a block of the preconditioner's pass over a dense in-memory X (about 2^20 values)
SCALE_BLOCK_VALUES = 1 << 20


def _feature_scale(X, backend):
    """s_j, the L-BFGS preconditioner, as a host float64 (D,) array: the root mean square of
    feature j rounded to a power of two, at least 1.

    The objective's curvature along W_cj grows with the mean of x_ij², so θ_cj = W_cj s_j with
    s_j ≈ rms_j evens the diagonal out (standardised features get s = 1: L-BFGS runs on the
    problem as given, as scikit-learn's does); features of any magnitude (1e150) are fitted.
    The mean is taken of (x / m)² with m = max |x| (no overflow), in blocks of rows (no
    temporary of X's size).  A power of two makes θ / s exact and the scale the same in any
    summation order (dask blocks, CuPy), but for an rms within rounding of a power's midpoint.
    """
    n = X.shape[0]
    if _is_sparse(X):  # CSR: the stored entries by column index (implicit zeros give 0)
        top = np.zeros(X.shape[1])
        np.maximum.at(top, X.indices, np.abs(X.data))
        m = np.where(top > 0, top, 1.0)
        ms = np.zeros(X.shape[1])
        np.add.at(ms, X.indices, (X.data / m[X.indices]) ** 2)
    else:
        hi, lo = X.max(axis=0), X.min(axis=0)
        if backend == DASK:
            hi, lo = _dask.compute(hi, lo)
        top = np.maximum(to_host(hi).astype(np.float64), -to_host(lo).astype(np.float64))
        m = np.where(top > 0, top, 1.0)
        if backend == DASK:  # in float64, as the in-memory branch (a 16-bit X included)
            ms = to_host(_dask.compute(((X.astype(np.float64) / m) ** 2).sum(axis=0))[0])
        else:
            xp = array_module(X)
            md = xp.asarray(m)
            ms = xp.zeros(X.shape[1])
            step = max(1, SCALE_BLOCK_VALUES // max(X.shape[1], 1))
            for r0 in range(0, n, step):
                block = X[r0:r0 + step].astype(np.float64) / md
                ms += (block * block).sum(axis=0)
            ms = to_host(ms)
    rms = m * np.sqrt(np.asarray(ms, np.float64) / max(n, 1))
    with np.errstate(divide="ignore"):
        power = np.exp2(np.round(np.log2(np.where(rms > 0, rms, 1.0))))
    return np.maximum(power, 1.0)


class SoftmaxClassifier(*_bases()):
    """Multinomial logistic regression (linear softmax classifier) on NumPy or CuPy data.

    Parameters
    ----------
    reg : float >= 0, default 1.0
        λ in ``Σ L_i + λ/2 ‖W‖²`` (scikit-learn's ``C = 1/λ``).
    fit_intercept : bool, default True
        Learn an unpenalised bias per class.
    solver : {"lbfgs", "sgd"}
        "lbfgs": scipy.optimize L-BFGS-B on the objective / N with exact gradients.
        It works in the variables θ_cj = W_cj s_j with s_j the root mean square of
        feature j rounded to a power of two (at least 1): a diagonal preconditioning that
        leaves the objective and its optimum unchanged, evens out the curvature of
        features of different scales (standardised features get s = 1) and lets features
        of any magnitude be fitted (unscaled, features around 1e150 give gradients near
        1e150 while J stays below N log C, and no line search step can satisfy its
        sufficient-decrease test).  "sgd": minibatch SGD with momentum on the device.
    max_iter : int >= 1
        L-BFGS iterations or SGD epochs.
    tol : float >= 0
        "lbfgs": stop once every component of ∂(J/N)/∂(W, b) is at most ``tol`` in
        magnitude (L-BFGS-B's projected-gradient test on θ with ``tol / max_j s_j``,
        which implies it), or when an iteration reduces J/N by at most 64 machine
        epsilons times max(1, J/N).  "sgd": stop when the epoch objective fails to improve by
        ``tol``·max(1, |J|) for 5 epochs in a row.
    batch_size : int >= 1, optional
        SGD minibatch (default min(256, N)).
    learning_rate : float > 0
        SGD step on the per-sample objective ``J / N``.
    momentum : float in [0, 1)
        SGD heavy-ball momentum.
    random_state : int, numpy Generator or RandomState, optional
        Seed of the SGD shuffles.
    verbose : int
        > 0 shows progress (a tqdm bar when tqdm is installed).

    Attributes
    ----------
    coef_ : (C, D) array, in the training data's array type (NumPy for scipy.sparse)
    intercept_ : (C,) array (zeros without fit_intercept)
    classes_ : (C,) array of the labels seen in fit (any sortable values, strings too)
    n_iter_ : int
    loss_curve_ : list of float, J after each iteration / epoch
    n_features_in_ : int
    feature_names_in_ : (D,) array of str
        Only when fitted on a DataFrame with string column names (scikit-learn's
        validate_data sets it).

    Warns
    -----
    ConvergenceWarning
        When L-BFGS or SGD stops at ``max_iter``, or L-BFGS ends abnormally (its line
        search cannot make progress).

    Raises
    ------
    FloatingPointError
        From fit with ``solver="sgd"`` when the objective goes non-finite or grows past
        ``DIVERGENCE_FACTOR`` times its value at zero parameters (lower learning_rate).
    NotFittedError
        From the prediction methods before fit.

    Notes
    -----
    Inputs: X (N, D) real numbers (ints and bools are converted to float64; complex,
    object arrays that are not numbers, empty arrays, NaN and inf are rejected with
    ValueError); y (N,) labels of a classification problem, at least 2 classes (a
    column vector warns DataConversionWarning and is raveled; continuous, NaN or inf
    labels are rejected).  scipy.sparse X is accepted (converted to CSR).  A bfloat16 X
    (ml_dtypes; NumPy, CuPy or dask) is fitted and predicted in float32 (an exact copy:
    the solvers need gradients finer than bfloat16's 8 bits); coef_ is then float32.

    See Also
    --------
    sklearn.linear_model.LogisticRegression : the same optimum with ``C = 1/reg`` for three
        or more classes.  For two it fits one vector w = W_1 − W_0; the softmax optimum has
        W_1 = −W_0 = w/2, so ``λ/2 ‖W‖² = λ/4 ‖w‖²`` and the match is ``C = 2/reg``.
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

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    # -- parameters -----------------------------------------------------------------------

    def _check_params(self):
        """Validate the constructor parameters (at fit, as scikit-learn does)."""
        _param("solver", self.solver, isinstance(self.solver, str) and self.solver in SOLVERS,
               f"one of {SOLVERS}")
        _param("reg", self.reg, _is_real(self.reg) and math.isfinite(self.reg) and self.reg >= 0,
               "a finite real number >= 0")
        _param("fit_intercept", self.fit_intercept, isinstance(self.fit_intercept, (bool, np.bool_)),
               "a bool")
        _param("max_iter", self.max_iter, _is_int(self.max_iter) and self.max_iter >= 1,
               "an integer >= 1")
        _param("tol", self.tol, _is_real(self.tol) and math.isfinite(self.tol) and self.tol >= 0,
               "a finite real number >= 0")
        _param("batch_size", self.batch_size,
               self.batch_size is None or (_is_int(self.batch_size) and self.batch_size >= 1),
               "None or an integer >= 1")
        _param("learning_rate", self.learning_rate,
               _is_real(self.learning_rate) and math.isfinite(self.learning_rate)
               and self.learning_rate > 0, "a finite real number > 0")
        _param("momentum", self.momentum,
               _is_real(self.momentum) and 0 <= self.momentum < 1, "a real number in [0, 1)")
        rs = self.random_state
        _param("random_state", rs,
               rs is None or (_is_int(rs) and rs >= 0)
               or isinstance(rs, (np.random.Generator, np.random.RandomState)),
               "None, an integer >= 0, a numpy Generator or a RandomState")
        _param("verbose", self.verbose,
               isinstance(self.verbose, (bool, np.bool_)) or (_is_int(self.verbose) and self.verbose >= 0),
               "an integer >= 0 or a bool")

    def _rng(self):
        rs = self.random_state
        if isinstance(rs, np.random.RandomState):  # scikit-learn's convention: draw a seed
            rs = int(rs.randint(np.iinfo(np.int32).max))
        return np.random.default_rng(rs)

    # -- input validation -----------------------------------------------------------------

    def _validate_X(self, X, reset):
        """(backend, xp, X), X checked: 2-D real floats, non-empty, finite, n_features_in_ set
        or matched; backend is X's (:func:`gpuce._dispatch.backend_of`), decided here once.

        Host inputs go through scikit-learn's validate_data when it is installed; CuPy and
        dask arrays (and host inputs without scikit-learn) through gpuce's own checks.  A
        dask X is checked lazily for finiteness here only when predicting (fit computes it
        with the classes).
        """
        if not reset:
            self._check_fitted()
        X = _bfloat16_as_float32(X)
        backend = backend_of(X)
        if _SK is not None and backend == HOST:
            X = _SK["validate_data"](self, X, reset=reset, accept_sparse="csr",
                                     dtype=(np.float64, np.float32), ensure_all_finite=True)
            return backend, np, X
        xp, X = self._check_X(X, backend)
        self._check_n_features(X, reset)
        if backend == DASK:
            if not reset:
                X = _dask.classifier_finite(X)
        elif not bool(xp.isfinite(X.data if _is_sparse(X) else X).all()):
            raise ValueError("X contains NaN or infinity")
        return backend, xp, X

    def _check_n_features(self, X, reset):
        d = X.shape[1]
        if reset:
            self.n_features_in_ = d
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        elif d != self.n_features_in_:
            raise ValueError(f"X has {d} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input (the number it was fitted with)")

    @staticmethod
    def _check_X(X, backend):
        """gpuce's own checks of X (CuPy, dask, or host data without scikit-learn)."""
        if backend == DASK:
            xp = _dask.classifier_module(X)
        elif backend == CUPY:
            xp = array_module(X)
        else:
            xp = np
            if _is_sparse(X):
                X = X.tocsr()
            else:
                X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"Expected a 2-D X (n_samples, n_features), got shape {X.shape}. "
                             "Reshape your data either using X.reshape(-1, 1) if it has a single "
                             "feature or X.reshape(1, -1) if it contains a single sample.")
        kind = X.dtype.kind
        if kind == "c":
            raise ValueError(f"Complex data not supported: X has dtype {X.dtype}; expected real numbers")
        if kind == "O":
            try:
                X = X.astype(np.float64)
            except (TypeError, ValueError) as e:
                # the exception type NumPy raised (TypeError for a dict, ValueError for a
                # string), as scikit-learn's check_array passes it on
                raise type(e)(f"X of dtype object must hold numbers; converting it to float64 "
                              f"failed: {e}") from e
        elif kind in "iub":
            X = X.astype(np.float64)
        elif kind != "f":
            raise ValueError(f"X must hold real numbers, got dtype {X.dtype}")
        # scikit-learn's wording (its estimator checks match it)
        if X.shape[0] == 0:
            raise ValueError(f"Found array with 0 sample(s) (shape={X.shape}) while a minimum of 1 "
                             "is required: at least 1 sample and 1 feature are required")
        if X.shape[1] == 0:
            raise ValueError(f"Found array with 0 feature(s) (shape={X.shape}) while a minimum of 1 "
                             "is required: at least 1 sample and 1 feature are required")
        return xp, X

    @staticmethod
    def _check_y_shape(X, y):
        """y as 1-D: a column vector warns and is raveled, as in scikit-learn."""
        if y is None:
            raise ValueError(f"{SoftmaxClassifier.__name__} requires y to be passed, but the target "
                             "y is None")
        if y.ndim == 2 and y.shape[1] == 1:
            warnings.warn("A column-vector y was passed when a 1d array was expected; it is "
                          "raveled to shape (n_samples,)", DataConversionWarning, stacklevel=4)
            y = y.reshape(-1)
        if y.ndim != 1 or y.shape[0] != X.shape[0]:
            raise ValueError(f"y must be 1-D with {X.shape[0]} labels (one per row of X), "
                             f"got shape {y.shape}")
        return y

    @staticmethod
    def _check_classes(classes):
        """The sorted distinct labels: at least 2, and labels of a classification problem."""
        kind = classes.dtype.kind
        if kind == "c":
            raise ValueError(f"Complex labels not supported: y has dtype {classes.dtype}")
        if kind == "f":
            xp = array_module(classes)
            if not bool(xp.isfinite(classes).all()):
                raise ValueError("y contains NaN or infinity; labels must be finite")
            if not bool((classes == xp.floor(classes)).all()):
                raise ValueError("Unknown label type: continuous. y holds non-integer floats; "
                                 "a classifier needs class labels (integers or strings)")
        if classes.shape[0] < 2:
            seen = repr(classes[0]) if classes.shape[0] else "none"
            raise ValueError("This solver needs samples of at least 2 classes in the data, but "
                             f"the data contains only one class: {seen}")

    # -- fitting --------------------------------------------------------------------------

    def fit(self, X, y):
        """Fit on X (N, D) and labels y (N,).

        Parameters
        ----------
        X : (N, D) array-like of real numbers: NumPy, CuPy, dask (chunked by rows),
            scipy.sparse, or anything scikit-learn's validate_data accepts
        y : (N,) labels (any sortable values); an (N, 1) column is raveled with a warning

        Returns
        -------
        self
        """
        self._check_params()
        backend = backend_of(X, y)
        if backend == DASK:
            xp, X, y_idx, classes = _dask.classifier_prepare(self, X, y)
        else:
            xp, X, y_idx, classes = self._prepare(X, y, backend)
        self.classes_ = classes
        c = classes.shape[0]
        t0 = time.perf_counter()
        if self.solver == "lbfgs":
            W, b, n_iter, curve = self._fit_lbfgs(backend, xp, X, y_idx, c)
        else:
            W, b, n_iter, curve = self._fit_sgd(xp, X, y_idx, c)
        self.fit_time_ = time.perf_counter() - t0
        self.coef_ = W
        self.intercept_ = b if b is not None else xp.zeros(c, X.dtype)
        self.n_iter_ = int(n_iter)
        self.loss_curve_ = curve
        return self

    def _prepare(self, X, y, backend):
        """Checked in-memory X, the labels as class indices and the classes (the dask form:
        :func:`gpuce._dask.classifier_prepare`)."""
        X = _bfloat16_as_float32(X)
        if _SK is not None and backend == HOST:
            X, y = _SK["validate_data"](self, X, y, accept_sparse="csr",
                                        dtype=(np.float64, np.float32), ensure_all_finite=True,
                                        multi_output=False, y_numeric=False)
            _SK["check_classification_targets"](y)
            xp, ymod = np, np
        else:
            _, xp, X = self._validate_X(X, reset=True)
            ymod = array_module(y) if is_cupy_array(y) else np
            y = self._check_y_shape(X, ymod.asarray(y) if y is not None else None)
        classes, y_idx = ymod.unique(y, return_inverse=True)
        self._check_classes(classes)
        return xp, X, xp.asarray(y_idx.reshape(-1).astype(np.int64)), classes

    def objective(self, X, y):
        """J(coef_, intercept_) = Σ L_i + λ/2 ‖W‖² on (X, y) with the fitted parameters."""
        backend, xp, X = self._validate_X(X, reset=False)
        y_idx = self._encode(xp, y)
        W, b = self._params_for(xp, X.dtype)
        loss, _, _ = self._loss_grad(X, W, b if self.fit_intercept else None, y_idx, float(self.reg),
                                     grad=False)
        return float(to_host(loss.compute() if backend == DASK else loss))

    @staticmethod
    def _loss_grad(X, W, b, y_idx, reg, grad=True):
        """(Σ L_i + reg/2 ‖W‖², dW, db) on X; dW, db are None when grad is False.

        Dense X (NumPy, CuPy, dask): :func:`linear_cross_entropy`.  scipy.sparse X: blocks
        of rows, logits from the sparse product, dW accumulated as Xᵀ G per block.
        """
        if not _is_sparse(X):
            out = linear_cross_entropy(X, W, y_idx, bias=b, reg=reg, reduction="sum",
                                       return_grad=grad, input_grad=False, check_finite=False)
            if not grad:
                return out, None, None
            loss, g = out
            return loss, g.W, g.bias
        n = X.shape[0]
        c = W.shape[0]
        step = max(1, SPARSE_BLOCK_ELEMENTS // c)
        loss = 0.0
        gW = np.zeros(W.shape[::-1], W.dtype) if grad else None  # (D, C), transposed at the end
        gb = np.zeros(c, W.dtype) if (grad and b is not None) else None
        for s in range(0, n, step):
            Xb = X[s:s + step]
            f = np.asarray(Xb @ W.T)
            if b is not None:
                f += b
            if not grad:
                loss += float(softmax_cross_entropy(f, y_idx[s:s + step], reduction="sum"))
                continue
            lb, G = softmax_cross_entropy(f, y_idx[s:s + step], reduction="sum", return_grad=True)
            loss += float(lb)
            gW += np.asarray(Xb.T @ G)
            if gb is not None:
                gb += G.sum(axis=0)
        W64 = W.astype(np.float64)
        loss += 0.5 * reg * float((W64 * W64).sum())
        if grad:
            gW = gW.T + W.dtype.type(reg) * W
        return loss, gW, gb

    def _fit_lbfgs(self, backend, xp, X, y_idx, c):
        from scipy.optimize import minimize

        n, d = X.shape
        nw = c * d
        fit_b = bool(self.fit_intercept)
        scale = _feature_scale(X, backend)  # θ = W · diag(scale): see the solver parameter
        curve = []
        bar = _progress(int(self.max_iter), self.verbose, "lbfgs")

        def unpack(theta):
            W = (theta[:nw].reshape(c, d) / scale).astype(X.dtype)
            b = xp.asarray(theta[nw:].astype(X.dtype)) if fit_b else None
            return xp.asarray(W), b

        def fun(theta):
            W, b = unpack(theta)
            loss, gW, gb = self._loss_grad(X, W, b, y_idx, float(self.reg))
            if backend == DASK:  # one graph: block partials, their tree, the finish
                loss, gW, gb = _dask.compute(loss, gW, gb)
            grad = [(to_host(gW).astype(np.float64) / scale).ravel()]
            if fit_b:
                grad.append(to_host(gb).astype(np.float64))
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
                       options=dict(maxiter=int(self.max_iter),
                                    gtol=float(self.tol) / scale.max(),  # |∂J/∂W| ≤ tol
                                    ftol=64 * np.finfo(float).eps, maxls=50))
        if bar is not None:
            bar.close()
        if res.status != 0:
            what = ("reached max_iter; increase max_iter or tol" if res.status == 1 else
                    "its line search could not decrease the objective; the data may be badly "
                    "scaled (standardize it) or tol below what the precision allows")
            warnings.warn(f"L-BFGS did not converge after {res.nit} iterations (max_iter="
                          f"{self.max_iter}): {what} (scipy: {res.message})",
                          ConvergenceWarning, stacklevel=3)
        W, b = unpack(res.x)
        return W, b, res.nit, curve

    def _fit_sgd(self, xp, X, y_idx, c):
        n, d = X.shape
        dt = X.dtype.type
        rng = self._rng()
        bs = int(self.batch_size or min(256, n))
        W = xp.zeros((c, d), X.dtype)
        b = xp.zeros(c, X.dtype) if self.fit_intercept else None
        vW = xp.zeros_like(W)
        vb = xp.zeros_like(b) if b is not None else None
        lr, mu, lam = dt(self.learning_rate), dt(self.momentum), float(self.reg)
        j_zero = n * math.log(c)  # J at W = 0, b = 0
        curve, best, stall = [], np.inf, 0
        bar = _progress(int(self.max_iter), self.verbose, "sgd")
        epoch, converged = 0, False
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported below
            for epoch in range(1, int(self.max_iter) + 1):
                perm = xp.asarray(rng.permutation(n))
                total = float64_accumulator(xp)
                for s in range(0, n, bs):
                    idx = perm[s:s + bs]
                    m = idx.shape[0]
                    loss, gW, gb = self._loss_grad(X[idx], W, b, y_idx[idx], 0.0)
                    total += loss
                    gW = gW * dt(1.0 / m) + dt(lam / n) * W
                    vW *= mu
                    vW -= lr * gW
                    W += vW
                    if b is not None:
                        vb *= mu
                        vb -= lr * (gb * dt(1.0 / m))
                        b += vb
                obj = float(total) + 0.5 * lam * float((W.astype(np.float64) ** 2).sum())
                curve.append(obj)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(objective=f"{obj:.6g}")
                elif self.verbose:
                    print(f"epoch {epoch:4d}  objective {obj:.8g}")
                if not math.isfinite(obj) or obj > DIVERGENCE_FACTOR * j_zero:
                    if bar is not None:
                        bar.close()
                    raise FloatingPointError(
                        f"SGD diverged at epoch {epoch}: objective {obj:.6g}, against "
                        f"{j_zero:.6g} at zero parameters; lower learning_rate (now "
                        f"{self.learning_rate!r}) or standardize X")
                if obj > best - float(self.tol) * max(1.0, abs(best)):
                    stall += 1
                    if stall >= 5:
                        converged = True
                        break
                else:
                    stall = 0
                best = min(best, obj)
        if bar is not None:
            bar.close()
        if not converged:
            warnings.warn(f"SGD stopped at max_iter={self.max_iter} epochs with the objective "
                          f"still improving by more than tol={self.tol} (relative); increase "
                          "max_iter or tol", ConvergenceWarning, stacklevel=3)
        return W, b, epoch, curve

    # -- prediction -----------------------------------------------------------------------

    def _check_fitted(self):
        if _SK is not None:
            _SK["check_is_fitted"](self, "coef_")
        elif not hasattr(self, "coef_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call "
                                 "'fit' with appropriate arguments before using this estimator.")

    def _params_for(self, xp, dtype):
        self._check_fitted()
        return (to_backend(xp, self.coef_).astype(dtype, copy=False),
                to_backend(xp, self.intercept_).astype(dtype, copy=False))

    def _encode(self, xp, y):
        classes = to_host(self.classes_)
        y = to_host(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.ravel()
        idx = np.searchsorted(classes, y)
        idx = np.clip(idx, 0, len(classes) - 1)
        if not np.all(classes[idx] == y):
            raise ValueError("y contains labels not seen in fit")
        return xp.asarray(idx.astype(np.int64))

    def _scores(self, X):
        """(backend, the (N, C) logits X Wᵀ + b), backend X's."""
        backend, xp, X = self._validate_X(X, reset=False)
        W, b = self._params_for(xp, X.dtype)
        if _is_sparse(X):
            return backend, np.asarray(X @ W.T) + b
        acc = acc_dtype(X.dtype)
        if acc != X.dtype:  # 16-bit X: X Wᵀ + b in float32, rounded once to X's dtype
            return backend, (X.astype(acc) @ W.T.astype(acc) + b.astype(acc)).astype(X.dtype)
        return backend, X @ W.T + b

    def decision_function(self, X):
        """Scores of X.

        Returns
        -------
        (N, C) array of logits ``X Wᵀ + b``; for a binary problem (C = 2) the (N,) log-odds
        ``f_1 − f_0`` of ``classes_[1]`` against ``classes_[0]``, as scikit-learn's
        classifiers return.
        """
        _, f = self._scores(X)
        if len(self.classes_) == 2:
            return f[:, 1] - f[:, 0]
        return f

    def predict_proba(self, X):
        """Class probabilities softmax(X Wᵀ + b), shape (N, C), columns in classes_ order."""
        return softmax(self._scores(X)[1], axis=-1)

    def predict_log_proba(self, X):
        """log_softmax(X Wᵀ + b), shape (N, C)."""
        return log_softmax(self._scores(X)[1], axis=-1)

    def predict(self, X):
        """The label of the largest score per row, shape (N,)."""
        backend, scores = self._scores(X)
        idx = scores.argmax(axis=1)
        classes = self.classes_
        if backend == DASK:
            return _dask.classifier_labels(idx, classes)
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
