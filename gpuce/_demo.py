"""``gpuce demo``: train the linear softmax classifier (L = Σ L_i + λ/2 ‖W‖²) on the digits data set.

Runs on the GPU when CuPy sees one, else on NumPy; prints backend and device, the
objective, train/test accuracy, fit time and a finite-difference check of dW at the
solution; writes the loss curve as a PNG; and checks softmax_cross_entropy on a
built-in batch against the float64 oracle.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def load_digits_split(seed=0):
    """scikit-learn's bundled digits (no network), X/16, stratified 75/25 split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - the demo extra installs it
        raise SystemExit("gpuce demo needs scikit-learn for the digits data: "
                         "pip install scikit-learn (gpuce's demo extra)") from e
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, test_size=0.25, stratify=y, random_state=seed)


def fd_check_dW(xp, X, y, W, b, reg, n_entries=6, h=1e-5, seed=0):
    """Central differences of J = Σ L_i + λ/2‖W‖² against the analytic dW at a few entries."""
    from ._backend import to_host
    from .linear import linear_cross_entropy

    def J(Wv):
        return float(linear_cross_entropy(X, Wv, y, bias=b, reg=reg, reduction="sum"))

    _, g = linear_cross_entropy(X, W, y, bias=b, reg=reg, reduction="sum", return_grad=True,
                                input_grad=False)
    dW, W_host = to_host(g.W), to_host(W)
    rng = np.random.default_rng(seed)
    errs = []
    for _ in range(n_entries):
        i, j = rng.integers(W_host.shape[0]), rng.integers(W_host.shape[1])
        Wp, Wm = W_host.copy(), W_host.copy()
        Wp[i, j] += h
        Wm[i, j] -= h
        fd = (J(xp.asarray(Wp)) - J(xp.asarray(Wm))) / (2 * h)
        errs.append(abs(fd - dW[i, j]))
    # scale: size of the data term's gradient entries, (Ŷ − Y)ᵀX without the penalty
    scale = float(np.abs(dW - reg * W_host).max())
    return max(errs), float(np.abs(dW).max()), scale


def train_digits(xp, label, reg=0.1, png="gpuce-demo-loss.png", out=print) -> bool:
    from .classifier import SoftmaxClassifier

    Xtr, Xte, ytr, yte = load_digits_split()
    Xtr_d, Xte_d, ytr_d, yte_d = (xp.asarray(a) for a in (Xtr, Xte, ytr, yte))
    out(f"digits: {Xtr.shape[0]} train / {Xte.shape[0]} test samples, {Xtr.shape[1]} features, "
        f"10 classes; objective Σ L_i + λ/2 ‖W‖², λ = {reg}, L-BFGS")
    # the progress bar only on a terminal: logs and pipes get the summary lines alone
    clf = SoftmaxClassifier(reg=reg, tol=1e-6, max_iter=1000, verbose=int(sys.stderr.isatty()))
    t0 = time.perf_counter()
    clf.fit(Xtr_d, ytr_d)
    fit_s = time.perf_counter() - t0
    J = clf.objective(Xtr_d, ytr_d)
    tr, te = clf.score(Xtr_d, ytr_d), clf.score(Xte_d, yte_d)
    err, gmax, scale = fd_check_dW(xp, Xtr_d, xp.asarray(ytr), clf.coef_, clf.intercept_, reg)
    fd_ok = err <= 1e-5 * max(1.0, scale)
    out(f"  backend            {label}")
    out(f"  objective J        {J:.6f}   ({clf.n_iter_} iterations)")
    out(f"  accuracy           train {tr:.4f}   test {te:.4f}")
    out(f"  fit time           {fit_s:.2f} s")
    out(f"  dW finite-diff.    max |dW - FD| = {err:.1e} over 6 entries (max |dW| = {gmax:.1e} at the "
        f"optimum; data-term scale {scale:.2f}): {'OK' if fd_ok else 'FAILED'}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.semilogy(np.arange(1, len(clf.loss_curve_) + 1), np.array(clf.loss_curve_) - J + 1e-3)
        ax.set_xlabel("L-BFGS iteration")
        ax.set_ylabel("gap to the optimum: J(W) − J* + 10⁻³")
        ax.set_title(f"gpuce demo: digits, λ={reg}, {label.split(' ')[0]}\n"
                     "J* = the objective at the solution found", fontsize=10)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
        out(f"  loss curve         {png}")
    except ImportError:
        out("  loss curve         (matplotlib not installed: pip install matplotlib, in gpuce's "
            "demo extra)")
    return fd_ok and te > 0.9
