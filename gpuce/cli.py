"""The ``gpuce`` command: ``gpuce demo`` (the main job), ``gpuce bench``, ``gpuce check-kernels``."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import _help


def _best_backend(requested: str):
    """(array module, label) for ``gpuce demo --backend``: CuPy when it is installed and sees
    a GPU (or when asked for, else SystemExit saying which of the two is missing)."""
    if requested == "numpy":
        return np, "numpy (CPU)"
    missing = _help.why_no_gpu()
    if missing is None:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return cupy, f"cupy (GPU: {name})"
    if requested == "cupy":
        raise SystemExit(f"gpuce demo: --backend cupy asked for, but {missing}")
    return np, f"numpy (CPU; {missing})"


def sce_check(xp, n=4096, c=1000, seed=0, out=print) -> bool:
    """Loss and gradient of a built-in batch on ``xp``, checked against the float64 NumPy oracle."""
    import gpuce
    from gpuce._backend import to_host

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c)) * 2).astype(np.float32)
    y = rng.integers(0, c, n)
    y[::17] = -100  # some ignored rows
    w = (0.5 + rng.random(c)).astype(np.float32)
    kw = dict(label_smoothing=0.1, z_loss=1e-4)
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


def _check_png_path(png: str):
    """SystemExit with one line unless the loss curve can be written at ``png`` (checked
    before any training: its folder exists and is writable)."""
    import os

    folder = os.path.dirname(os.path.abspath(png)) or "."
    if not os.path.isdir(folder):
        raise SystemExit(f"gpuce demo: --png {png}: no such directory {folder}")
    if not os.access(folder, os.W_OK) or os.path.isdir(png):
        raise SystemExit(f"gpuce demo: --png {png}: cannot write a file there")


def demo(args) -> int:
    from ._demo import train_digits

    _check_png_path(args.png)
    xp, label = _best_backend(args.backend)
    print(f"gpuce demo -- backend: {label}")
    ok = train_digits(xp, label, png=args.png)
    ok = sce_check(xp) and ok
    print("demo:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def check_kernels(args) -> int:
    """Compile every kernel through NVRTC, print ptxas's report and apply the test suite's
    spill rule (:mod:`gpuce._cuda.checks`).  0 exactly when the rule holds everywhere."""
    from ._cuda import checks

    archs = tuple(args.arch)
    missing = _why_no_nvrtc()
    if missing is not None:
        print(f"check-kernels: FAILED: cannot compile: {missing}")
        return 1
    try:
        jobs = checks.compile_jobs(archs)
    except ImportError as e:
        print(f"check-kernels: FAILED: cannot compile without CuPy and NVRTC ({e}); "
              "pip install cupy-cuda13x nvidia-cuda-nvrtc")
        return 1
    print(f"check-kernels: compiling {len(jobs)} NVRTC programs for {', '.join(archs)} "
          "(no GPU needed; about 2 minutes an architecture on 2 CPU cores)", flush=True)
    results = []
    bar = _progress_bar(len(jobs), "check-kernels")
    for i, (label, job) in enumerate(jobs, 1):
        if bar is None:
            print(f"[{i:{len(str(len(jobs)))}d}/{len(jobs)}] {label}", file=sys.stderr, flush=True)
        try:
            results.extend(job())
        except ImportError as e:
            print(f"check-kernels: FAILED: cannot compile without CuPy and NVRTC ({e}); "
                  "pip install cupy-cuda13x nvidia-cuda-nvrtc")
            return 1
        except RuntimeError as e:  # NVRTC refused a source: the suite fails the same way
            if bar is not None:
                bar.close()
            print(e)
            print(f"check-kernels: FAILED: {label} does not compile")
            return 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    shown = args.arch[-1]
    for r in results:
        names = checks.entry_names(r)
        if r.arch == shown:
            for fn, regs in r.registers.items():
                st, ld = r.spills.get(fn, (0, 0))
                print(f"{names.get(fn, fn):56s} {r.arch}  regs {regs:3d}  spill {st}/{ld} B")
    bad = checks.violations(results)
    for v in bad:
        print("over budget:", v)
    entries = sum(len(r.registers) for r in results)
    where = f"{entries} kernel entries in {len(results)} NVRTC programs for {', '.join(archs)}"
    if bad:
        print(f"check-kernels: FAILED: {len(bad)} of {where} break the spill rule (listed above)")
        return 1
    print(f"check-kernels: OK: {where}, every one within the spill rule "
          f"(fused: 0 B, {checks.DOUBLE_ABI_SPILL_BUDGET} B when accumulating in double; "
          "others: 0 B on sm_90)")
    return 0


def _why_no_nvrtc():
    """None when CuPy's NVRTC binding loads and compiles; else why not, in words."""
    try:
        from cupy.cuda import nvrtc
    except ImportError as e:
        return (f"CuPy is not installed or incomplete ({e}); "
                "pip install cupy-cuda13x nvidia-cuda-nvrtc")
    try:
        nvrtc.getVersion()
    except Exception as e:  # the NVRTC library itself is missing
        return (f"CuPy cannot load NVRTC ({type(e).__name__}: {e}); "
                "pip install nvidia-cuda-nvrtc")
    return None


def _progress_bar(total, desc):
    """A tqdm bar on a terminal (stderr a TTY, tqdm installed); else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc)


def bench(argv) -> int:
    """``gpuce bench``: the benchmark suite (:func:`gpuce.benchmark.main`; ``--dry`` writes into a
    temporary directory it removes, unless ``--results-dir`` is given), with progress bars off
    when stderr is not a terminal."""
    from .benchmark import main as bench_main

    argv = list(argv)
    given = {a.split("=", 1)[0] for a in argv}
    if not sys.stderr.isatty() and "--no-progress" not in given and not {"-h", "--help"} & given:
        argv.append("--no-progress")
    return bench_main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark suite has its own options
        return bench(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpuce", description=_help.plain_text(__doc__))
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the main job on the best backend")
    d.add_argument("--backend", choices=["auto", "numpy", "cupy"], default="auto",
                   help="auto (default): CuPy when it is installed and sees a GPU, else NumPy; "
                        "numpy: the CPU; cupy: the GPU, or an error saying what is missing")
    d.add_argument("--png", default="gpuce-demo-loss.png", help="where to write the loss curve")
    d.set_defaults(func=demo)
    k = sub.add_parser("check-kernels",
                       help="compile every kernel with NVRTC (no GPU needed), print ptxas's "
                            "registers and spills, apply the test suite's spill rule; exit 0 "
                            "exactly when it holds")
    k.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], metavar="SM",
                   help="target architectures (default: sm_80 sm_90, as the test suite); the "
                        "report is printed for the last")
    k.set_defaults(func=check_kernels)
    sub.add_parser("bench", help="benchmark suite: loss + gradient against a device copy and "
                                 "other libraries; --dry runs without a GPU (gpuce bench --help)")
    return p


if __name__ == "__main__":
    sys.exit(main())
