"""Linear softmax classifier benchmarks.

GPU (--gpu): one objective + gradient evaluation of ``linear_cross_entropy`` (reduction "sum",
reg, dW and db -- what a trainer needs) against the two GEMMs of the same shapes (X Wᵀ and
Gᵀ X) timed in the same run; goal <= 1.3x.  Shapes: N=2^20, D=512, C=100 and N=65536,
D=4096, C=1000, float32.

CPU (default): SoftmaxClassifier(solver="lbfgs") against scikit-learn's
LogisticRegression(lbfgs), both at their default settings and the same λ (objective
J = Σ L_i + λ/2 ‖W‖² reported for both), on digits (X/16 and standardised) and on a synthetic
N=100000, D=256, C=50 set: iterations, fit time, and the iteration at which gpuce first
reaches scikit-learn's final objective.

Rows go to bench/results/linear.csv.

    python bench/bench_linear.py [--gpu] [--dry]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import gpuce
from gpuce.benchmark import cpu_name, upsert

CSV = Path(__file__).resolve().parent / "results" / "linear.csv"


def gpu_rows(dry, repeat):
    import cupy as cp
    from cupyx.profiler import benchmark

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    shapes = [(2**20, 512, 100), (65536, 4096, 1000)] if not dry else [(4096, 64, 10)]
    rows = []
    for n, d, c in shapes:
        X = cp.random.standard_normal((n, d), dtype=cp.float32)
        W = cp.random.standard_normal((c, d), dtype=cp.float32) * 0.01
        b = cp.zeros(c, cp.float32)
        y = cp.random.randint(0, c, n)
        f = cp.empty((n, c), cp.float32)
        dW = cp.empty_like(W)

        def two_gemms():
            cp.matmul(X, W.T, out=f)
            cp.matmul(f.T, X, out=dW)

        def obj_grad():
            gpuce.linear_cross_entropy(X, W, y, bias=b, reg=0.1, reduction="sum", return_grad=True,
                                       input_grad=False, check_finite=False)

        res = {}
        for name, fn in (("two-gemms", two_gemms), ("gpuce-linear", obj_grad)):
            r = benchmark(fn, n_repeat=repeat, n_warmup=3)
            res[name] = np.percentile(r.gpu_times[0] * 1e3, [20, 50, 80])
        ratio = res["gpuce-linear"][1] / res["two-gemms"][1]
        print(f"N={n} D={d} C={c}: two GEMMs {res['two-gemms'][1]:.3f} ms, objective+grad "
              f"{res['gpuce-linear'][1]:.3f} ms, ratio {ratio:.2f} (goal <= 1.3)   {gpu}")
        for name, t in res.items():
            rows.append(dict(op="linear_objective_grad", provider=name, mode="full", dtype="float32",
                             N=n, C=c, gpu_name=gpu, p20_ms=f"{t[0]:.4f}", p50_ms=f"{t[1]:.4f}",
                             p80_ms=f"{t[2]:.4f}", note=f"D={d}; ratio_to_gemms={t[1] / res['two-gemms'][1]:.3f}"))
        del X, W, f, dW
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def objective(X, y, W, b, lam):
    return float(gpuce.linear_cross_entropy(X, W, y, bias=b, reg=lam, reduction="sum"))


def cpu_rows(dry):
    """SoftmaxClassifier against scikit-learn's LogisticRegression(lbfgs), both at their
    defaults (gpuce tol=1e-6, scikit-learn tol=1e-4), same λ: total iterations and fit time,
    the objective each reaches, and the iteration at which gpuce's loss curve first reaches
    scikit-learn's final objective (the criterion: at most 1.5x scikit-learn's iterations and
    time)."""
    import warnings

    from sklearn.datasets import load_digits, make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    sets = [("digits/16", X / 16.0, y), ("digits-standardised", StandardScaler().fit_transform(X), y)]
    if dry:
        sets = [("digits", X[:300] / 16.0, y[:300])]
    else:
        Xs, ys = make_classification(n_samples=100000, n_features=256, n_informative=64,
                                     n_classes=50, n_clusters_per_class=1, random_state=0)
        sets.append(("synthetic-100000x256x50", Xs, ys))
    lam, rows, machine = 1.0, [], cpu_name()
    print(f"{'data':24s} {'sklearn':>28s} {'gpuce':>40s}")
    for name, X, y in sets:
        t0 = time.perf_counter()
        sk = LogisticRegression(C=1 / lam, max_iter=10000).fit(X, y)
        t_sk = time.perf_counter() - t0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            ours = gpuce.SoftmaxClassifier(reg=lam, max_iter=10000).fit(X, y)
            t_ours = time.perf_counter() - t0
        j_sk = objective(X, y, sk.coef_, sk.intercept_, lam)
        j_ours = objective(X, y, ours.coef_, ours.intercept_, lam)
        it_sk = int(np.max(sk.n_iter_))
        reach = next((i + 1 for i, j in enumerate(ours.loss_curve_) if j <= j_sk * (1 + 1e-12)), None)
        print(f"{name:24s} {it_sk:5d} it {t_sk:7.2f} s J={j_sk:.6f}   {ours.n_iter_:5d} it {t_ours:7.2f} s "
              f"J={j_ours:.6f}; sklearn's J at iteration {reach} ({(reach or 0) / it_sk:.2f}x), "
              f"time {t_ours / t_sk:.2f}x, {len(caught)} warnings")
        for prov, t, j, it, extra in (
                ("sklearn-lbfgs", t_sk, j_sk, it_sk, "tol=1e-4 (default)"),
                ("gpuce-lbfgs", t_ours, j_ours, ours.n_iter_,
                 f"tol=1e-6 (default); reaches sklearn's J at iteration {reach}; "
                 f"warnings={len(caught)}")):
            rows.append(dict(op="fit", provider=prov, mode=name, dtype=str(X.dtype), N=X.shape[0],
                             C=len(np.unique(y)), gpu_name=machine, p50_ms=f"{t * 1e3:.1f}",
                             note=f"{name}; D={X.shape[1]}; J={j:.8f}; iters={it}; reg={lam}; {extra}"))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--dry", action="store_true", help="tiny sizes, no CSV")
    a = p.parse_args(argv)
    rows = gpu_rows(a.dry, a.repeat) if a.gpu else cpu_rows(a.dry)
    if not a.dry:
        print("wrote", upsert(CSV, rows))


if __name__ == "__main__":
    main()
