"""The ``gpuce`` command: ``gpuce demo`` (the main job), ``gpuce bench``, ``gpuce check-kernels``."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _best_backend(requested: str):
    from ._backend import cupy_available

    if requested == "numpy":
        return np, "numpy (CPU)"
    if requested in ("auto", "cupy") and cupy_available():
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return cupy, f"cupy (GPU: {name})"
    if requested == "cupy":
        raise SystemExit("gpuce demo: --backend cupy asked for, but CuPy sees no GPU")
    return np, "numpy (CPU; no GPU visible to CuPy)"


def sce_check(xp, n=4096, c=1000, seed=0, out=print) -> bool:
    """Loss and gradient of a built-in batch on ``xp``, checked against the float64 NumPy oracle."""
    import gpuce

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c)) * 2).astype(np.float32)
    y = rng.integers(0, c, n)
    y[::17] = -100  # some ignored rows
    w = (0.5 + rng.random(c)).astype(np.float32)
    kw = dict(label_smoothing=0.1, z_loss=1e-4)
    to_host = (lambda a: a.get()) if xp is not np else np.asarray
    xd, yd, wd = xp.asarray(x), xp.asarray(y), xp.asarray(w)
    gpuce.softmax_cross_entropy(xd, yd, weight=wd, return_grad=True, **kw)  # warm-up (compiles)
    t0 = time.perf_counter()
    loss, grad = gpuce.softmax_cross_entropy(xd, yd, weight=wd, return_grad=True, **kw)
    loss_h, grad_h = float(to_host(loss)), to_host(grad)
    dt = time.perf_counter() - t0
    ref_loss, ref_grad = gpuce.softmax_cross_entropy(x.astype(np.float64), y, return_grad=True,
                                                     weight=w.astype(np.float64), **kw)
    rel_loss = abs(loss_h - float(ref_loss)) / abs(float(ref_loss))
    rel_grad = float(np.linalg.norm(grad_h - ref_grad) / np.linalg.norm(ref_grad))
    ok = rel_loss < 1e-5 and rel_grad < 1e-5
    out(f"softmax_cross_entropy  batch {n} x {c} float32, weight, label_smoothing=0.1, z_loss=1e-4")
    out(f"  loss {loss_h:.6f}  (float64 oracle {float(ref_loss):.6f}, rel. err {rel_loss:.1e})")
    out(f"  grad rel. err ||g - g64|| / ||g64|| = {rel_grad:.1e}   time {dt * 1e3:.1f} ms (loss+grad, incl. copy back)")
    out(f"  check: {'OK' if ok else 'FAILED'}")
    return ok


def demo(args) -> int:
    from ._demo import train_digits

    xp, label = _best_backend(args.backend)
    print(f"gpuce demo -- backend: {label}")
    ok = train_digits(xp, label, png=args.png)
    ok = sce_check(xp) and ok
    print("demo:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def check_kernels(args) -> int:
    from . import _nvrtc

    results = _nvrtc.compile_all(archs=tuple(args.arch))
    worst = 0
    for r in results:
        names = {v: k for k, v in (r.lowered or {}).items()}  # mangled -> template expression
        for fn, regs in r.registers.items():
            st, ld = r.spills.get(fn, (0, 0))
            worst = max(worst, st + ld)
            if r.arch == args.arch[-1]:
                print(f"{names.get(fn, fn):56s} {r.arch}  regs {regs:3d}  spill {st}/{ld} B")
    entries = sum(len(r.registers) for r in results)
    print(f"compiled {entries} kernel entries in {len(results)} NVRTC programs for {', '.join(args.arch)}")
    return 1 if worst else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark suite has its own options
        from .benchmark import main as bench_main

        return bench_main(argv[1:])
    p = argparse.ArgumentParser(prog="gpuce", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the main job on the best backend")
    d.add_argument("--backend", choices=["auto", "numpy", "cupy"], default="auto")
    d.add_argument("--png", default="gpuce-demo-loss.png", help="where to write the loss curve")
    d.set_defaults(func=demo)
    k = sub.add_parser("check-kernels", help="compile every kernel with NVRTC, print ptxas usage")
    k.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"])
    k.set_defaults(func=check_kernels)
    sub.add_parser("bench", help="benchmark suite (gpuce bench --help)")
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
