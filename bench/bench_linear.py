"""Linear softmax classifier benchmarks.

GPU (--gpu): one objective + gradient evaluation of ``linear_cross_entropy`` (reduction "sum",
reg, dW and db -- what a trainer needs) against the two GEMMs of the same shapes (X Wᵀ and
Gᵀ X) timed in the same run; goal <= 1.3x.  Shapes: N=2^20, D=512, C=100 and N=65536,
D=4096, C=1000, float32.

CPU (default): fit time of SoftmaxClassifier(solver="lbfgs") against scikit-learn's
LogisticRegression(lbfgs) to the same objective (both from zero, same tol, objective
J = Σ L_i + λ/2 ‖W‖² reported for both), on digits and on a synthetic
N=100000, D=256, C=50 set.

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
    from sklearn.datasets import load_digits, make_classification
    from sklearn.linear_model import LogisticRegression

    X, y = load_digits(return_X_y=True)
    sets = [("digits", X / 16.0, y)]
    if dry:
        sets = [("digits", X[:300] / 16.0, y[:300])]
    else:
        Xs, ys = make_classification(n_samples=100000, n_features=256, n_informative=64,
                                     n_classes=50, n_clusters_per_class=1, random_state=0)
        sets.append(("synthetic-100000x256x50", Xs, ys))
    lam, tol, rows, machine = 1.0, 1e-6, [], cpu_name()
    for name, X, y in sets:
        t0 = time.perf_counter()
        sk = LogisticRegression(C=1 / lam, tol=tol, max_iter=10000).fit(X, y)
        t_sk = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = gpuce.SoftmaxClassifier(reg=lam, tol=tol, max_iter=10000).fit(X, y)
        t_ours = time.perf_counter() - t0
        j_sk = objective(X, y, sk.coef_, sk.intercept_, lam)
        j_ours = objective(X, y, ours.coef_, ours.intercept_, lam)
        print(f"{name:26s} sklearn {t_sk:7.2f} s (J={j_sk:.6f}, {int(np.max(sk.n_iter_))} it)   "
              f"gpuce {t_ours:7.2f} s (J={j_ours:.6f}, {ours.n_iter_} it)   ratio {t_ours / t_sk:.2f}")
        for prov, t, j, it in (("sklearn-lbfgs", t_sk, j_sk, int(np.max(sk.n_iter_))),
                               ("gpuce-lbfgs", t_ours, j_ours, ours.n_iter_)):
            rows.append(dict(op="fit", provider=prov, mode="fit", dtype=str(X.dtype), N=X.shape[0],
                             C=len(np.unique(y)), gpu_name=machine, p50_ms=f"{t * 1e3:.1f}",
                             note=f"{name}; D={X.shape[1]}; J={j:.8f}; iters={it}; reg={lam}; tol={tol}"))
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
