"""Benchmark harness: ``gpuce bench`` / ``python -m bench``.

The harness is this module: the sweep of softmax cross-entropy forward+backward (loss and
gradient with respect to the logits) over C at fixed N*C, the timing and memory probes, the
tidy CSV, the plot and the README table.  The providers (gpuce's paths, naive CuPy, torch
eager and compiled, Liger-Kernel) are not here: each op's live in one file of the source
tree's ``bench/`` folder (bench/providers_ce.py for this sweep, bench/providers_lce.py for the
linear cross-entropy of bench/bench_lce.py).  Every such file has the same small interface:
``OP`` (the CSV's op), ``NAMES`` (its provider names) and ``providers(xp, torch, **options)``
-> {name: callable}; the sweeps take the provider module as an argument (``module``, by
default this op's).

How the providers are found: :func:`load_providers` imports ``providers_<op>.py`` by file
path from :func:`provider_dir`, never as ``bench.providers_<op>`` (bench/ is a package of the
source checkout only, not of the wheel).  The wheel carries the same files as
``gpuce/bench_providers/`` (pyproject.toml force-includes them, as it does kernels/), and
that folder is looked in first, so ``gpuce bench`` from an installed wheel finds them too.

A device-to-device copy of the logits (provider ``copy``) is the bandwidth yardstick.
Metrics: p20 / p50 / p80 ms of the whole call as a user sees it (cupyx.profiler.benchmark,
CUDA events), its host time per call (``cpu_ms``, the benchmark's cpu_times), for
gpuce-fused the kernels alone relaunched with the call's arguments (``kernel_ms``), GB/s
counted as one read and one write of the logits, the fraction of the copy's time, the byte
floor (``floor_ms``: logits read + gradient written + labels read, over the copy's measured
bandwidth) and the fraction of it, and the peak extra device memory of one call.  Rows are
upserted into a tidy CSV keyed by (op, provider, mode, dtype, N, C, gpu_name); the plot,
the fixed/marginal split (:func:`fixed_marginal`) and the README table are drawn from the
CSV, never by hand.

``--dry`` runs the same harness with no GPU (the NumPy provider, tiny sizes) to check the
machinery: CSV, plot and table.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import importlib.util
import math
import os
import sys
import platform
import re
import time
from pathlib import Path

import numpy as np

KEY = ("op", "provider", "mode", "dtype", "N", "C", "gpu_name")
FIELDS = KEY + ("p20_ms", "p50_ms", "p80_ms", "gbps", "frac_of_copy", "peak_extra_mib", "note",
                "timestamp", "version", "cpu_ms", "kernel_ms", "floor_ms", "frac_of_floor")
CLASSES = (10, 100, 1000, 4096, 32768, 131072, 262144)
BENCH_DTYPES = ("float16", "bfloat16", "float32", "float64")
TOTALS = (2**28, 2**30)
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


# ------------------------------------------------------------------------------------ CSV

def default_results_dir() -> Path:
    """bench/results of the source checkout when run from one, else ./gpuce-bench-results."""
    here = Path(__file__).resolve().parent.parent / "bench" / "results"
    return here if here.parent.is_dir() else Path.cwd() / "gpuce-bench-results"


def cpu_name() -> str:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu:{platform.processor() or platform.machine()}:{n}cores"


def upsert(path: Path, rows: list[dict]) -> Path:
    """Insert or replace ``rows`` (keyed by KEY) in the CSV at ``path``."""
    from . import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = {}
    if path.exists():
        with path.open() as f:
            for r in csv.DictReader(f):
                existing[tuple(r.get(k, "") for k in KEY)] = r
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for r in rows:
        r = {k: ("" if r.get(k) is None else str(r.get(k))) for k in FIELDS}
        r["timestamp"] = r["timestamp"] or stamp
        r["version"] = r["version"] or __version__
        existing[tuple(r[k] for k in KEY)] = r
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for k in sorted(existing, key=lambda k: tuple(_sortable(x) for x in k)):
            w.writerow({f: existing[k].get(f, "") for f in FIELDS})
    return path


def _sortable(v):
    return (0, int(v), "") if str(v).isdigit() else (1, 0, str(v))


def read_rows(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ providers

_PKG_DIR = Path(__file__).resolve().parent


def provider_dir() -> Path:
    """The folder holding the providers_<op>.py files: ``gpuce/bench_providers`` in an
    installed wheel, the source tree's ``bench/`` otherwise."""
    for d in (_PKG_DIR / "bench_providers", _PKG_DIR.parent / "bench"):
        if (d / "providers_ce.py").is_file():
            return d
    raise FileNotFoundError("gpuce's benchmark providers were not found: looked in "
                            f"{_PKG_DIR / 'bench_providers'} and {_PKG_DIR.parent / 'bench'}")


@functools.lru_cache(maxsize=None)
def load_providers(op: str):
    """The provider module of ``op`` (``providers_<op>.py`` in :func:`provider_dir`), imported
    once a process by path, as ``gpuce_bench_providers_<op>``."""
    path = provider_dir() / f"providers_{op}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark providers for {op!r}: {path} does not exist")
    name = f"gpuce_bench_providers_{op}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def optional_torch():
    """torch when it is importable and sees a CUDA device, else None: the ``torch`` argument
    of a provider file's ``providers`` (its torch-based providers are left out with None)."""
    try:
        import torch

        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


# ------------------------------------------------------------------------------ measuring

def _np_dtype(name):
    from ._validation import bfloat16_dtype

    return bfloat16_dtype() if name == "bfloat16" else np.dtype(name)


def gpu_time(cp, fn, repeat, with_cpu=False):
    """p20/p50/p80 ms of ``fn`` on the device (CUDA events around the whole call), and with
    ``with_cpu`` also the p50 host time of a call."""
    from cupyx.profiler import benchmark

    r = benchmark(fn, n_repeat=repeat, n_warmup=2)
    t = np.percentile(r.gpu_times[0] * 1e3, [20, 50, 80])
    return (t, float(np.median(r.cpu_times) * 1e3)) if with_cpu else t


def byte_floor(n, c, itemsize, label_bytes, reduction="mean"):
    """Bytes a fused forward+backward must move: the logits read, the gradient written, the
    labels read, and the per-row loss written for reduction "none"."""
    return 2 * n * c * itemsize + n * label_bytes + (4 * n if reduction == "none" else 0)


def peak_extra_mib(cp, fn):
    """Device memory one call adds on top of its inputs (CuPy pool, or torch's peak)."""
    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    torch_peak = None
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t_before = torch.cuda.memory_allocated()
            torch_peak = (torch, t_before)
    except Exception:
        pass
    out = fn()
    cp.cuda.Device().synchronize()
    extra = pool.total_bytes() - before
    if torch_peak is not None:
        torch, t_before = torch_peak
        extra += max(0, torch.cuda.max_memory_allocated() - t_before)
    del out
    return extra / 2**20


def gpu_sweep(classes, totals, dtypes, repeat, providers=None, progress=True, on_rows=None,
              variants=False, rows=None, softcap=None, module=None):
    """Measure every (N*C, dtype, C) point; ``on_rows(rows)`` is called after each point (the
    CLI upserts there, so a sweep cut short by a time limit keeps what it measured).
    ``module``: the provider module (default bench/providers_ce.py); ``providers``: only these
    of its names.  ``variants``: also time every other fused plan that can run the shape (each
    pinned through the backend's ``variant`` argument), as providers ``fused[<variant>]`` --
    the data the planner's order is set from.  ``rows``: a fixed N for every C instead of
    N = total // C (the small-C target is stated at N = 2^24)."""
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    ce = module if module is not None else load_providers("ce")
    provs = ce.providers(cp, optional_torch(), softcap=softcap)
    if providers:
        provs = {k: v for k, v in provs.items() if k in providers}
    fixed_n = rows
    plan = [(t, c, d) for t in (totals if fixed_n is None else [None]) for d in dtypes for c in classes]
    bar = _bar(len(plan), progress)
    rows = []
    for total, c, dtype in plan:
        n = max(1, total // c) if fixed_n is None else int(fixed_n)
        x = cp.random.standard_normal((n, c), dtype=cp.float32).astype(_np_dtype(dtype))
        y = cp.random.randint(0, c, n).astype(cp.int64)
        dst = cp.empty_like(x)
        res = {"copy": (gpu_time(cp, lambda: cp.copyto(dst, x), repeat), 0.0, "")}
        extra = {}
        for name, fn in provs.items():
            try:
                t, cpu = gpu_time(cp, lambda: fn(x, y), repeat, with_cpu=True)
                peak = peak_extra_mib(cp, lambda: fn(x, y))
                note, more = (ce.describe(cp, name, x, y, repeat, softcap)
                              if hasattr(ce, "describe") else ("", {}))
                extra[name] = {"cpu_ms": f"{cpu:.4f}", **more}
                res[name] = (t, peak, note)
            except Exception as e:  # out of memory for a provider: record and go on
                res[name] = (None, None, f"failed: {type(e).__name__}: {str(e)[:80]}")
            cp.get_default_memory_pool().free_all_blocks()
        if variants:
            res.update(ce.variant_times(cp, x, y, repeat))
        nbytes = 2 * x.itemsize * n * c
        floor = byte_floor(n, c, x.itemsize, y.itemsize) / (nbytes / res["copy"][0][1])  # ms
        op = ce.OP if softcap is None else f"{ce.OP}_softcap{softcap:g}"
        point = [_row(op if name != "copy" else "copy", name, "full",
                      np.dtype(dtype).name, n, c, gpu, t, nbytes, res["copy"][0], peak, note,
                      floor_ms=floor, **extra.get(name, {}))
                 for name, (t, peak, note) in res.items()]
        rows += point
        if on_rows is not None:
            on_rows(point)
        if not progress:
            print(f"{np.dtype(dtype).name} N={n} C={c}: " + ", ".join(
                f"{k} {v[0][1]:.3f} ms" if v[0] is not None else f"{k} failed"
                for k, v in res.items()), flush=True)
        del x, y, dst
        cp.get_default_memory_pool().free_all_blocks()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows, gpu


def cpu_sweep(classes, totals, dtypes, repeat, note="", module=None):
    """The CPU providers (``module.providers(numpy)``; by default bench/providers_ce.py's:
    gpuce's NumPy path) against a copy.  ``--dry`` runs it at tiny sizes to check the harness
    without a GPU; bench/bench_sce_cpu.py at real ones."""
    ce = module if module is not None else load_providers("ce")
    provs = ce.providers(np)
    name = cpu_name()
    rows = []
    rng = np.random.default_rng(0)
    for total in totals:
        for dtype in dtypes:
            for c in classes:
                n = max(1, total // c)
                x = rng.standard_normal((n, c)).astype(_np_dtype(dtype))
                y = rng.integers(0, c, n)
                dst = np.empty_like(x)

                def timed(fn):
                    fn()
                    ts = []
                    for _ in range(repeat):
                        t0 = time.perf_counter()
                        fn()
                        ts.append((time.perf_counter() - t0) * 1e3)
                    return np.percentile(ts, [20, 50, 80])

                copy = timed(lambda: np.copyto(dst, x))
                nbytes = 2 * x.itemsize * n * c
                rows.append(_row("copy", "copy", "full", np.dtype(dtype).name, n, c, name, copy, nbytes,
                                 copy, 0.0, note))
                for prov, fn in provs.items():
                    t = timed(lambda: fn(x, y))
                    rows.append(_row(ce.OP, prov, "full", np.dtype(dtype).name, n, c, name, t, nbytes,
                                     copy, None, note))
    return rows, name


def _row(op, provider, mode, dtype, n, c, gpu, t, nbytes, copy_t, peak, note, floor_ms=None, **extra):
    r = dict(op=op, provider=provider, mode=mode, dtype=dtype, N=n, C=c, gpu_name=gpu, note=note, **extra)
    if t is not None:
        r.update(p20_ms=f"{t[0]:.4f}", p50_ms=f"{t[1]:.4f}", p80_ms=f"{t[2]:.4f}",
                 gbps=f"{nbytes / (t[1] / 1e3) / 1e9:.4g}",
                 frac_of_copy=f"{copy_t[1] / t[1]:.3f}" if copy_t is not None else "")
        if floor_ms is not None:
            r.update(floor_ms=f"{floor_ms:.4f}", frac_of_floor=f"{floor_ms / t[1]:.3f}")
    if peak is not None:
        r["peak_extra_mib"] = f"{peak:.1f}"
    return r


def _bar(total, progress):
    import sys

    if not progress or not sys.stderr.isatty():  # quiet off a terminal (logs, CI)
        return None
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="gpuce bench")
    except ImportError:
        return None


# ------------------------------------------------------------------------------ reporting

def plot(rows, png: Path, gpu_name: str, dtype="float32"):
    """Fraction of the copy's time against C, one line per provider, largest N*C only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["gpu_name"] == gpu_name and r["dtype"] == dtype and r["frac_of_copy"]
           and r["provider"] != "copy"]
    if not sel:
        return None
    total = max(int(r["N"]) * int(r["C"]) for r in sel)
    sel = [r for r in sel if abs(int(r["N"]) * int(r["C"]) - total) <= int(r["C"])]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for prov in sorted({r["provider"] for r in sel if not r["provider"].startswith("fused[")}):
        pts = sorted((int(r["C"]), float(r["frac_of_copy"])) for r in sel if r["provider"] == prov)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
    ax.set_xscale("log")
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("C (classes)")
    ax.set_ylabel("fraction of device-copy bandwidth")
    ax.set_title(f"softmax CE fwd+bwd, {dtype}, N·C ≈ 2^{int(round(np.log2(total)))}, {gpu_name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def table(rows, gpu_name: str, dtype="float32") -> str:
    """Markdown table (C rows x provider columns: p50 ms and fraction of copy) from the CSV."""
    sel = [r for r in rows if r["gpu_name"] == gpu_name and r["dtype"] == dtype and r["p50_ms"]]
    if not sel:
        return f"(no rows for {gpu_name}, {dtype})"
    # one run: the rows of the latest day only (a table never mixes kernels of two runs) ...
    latest = max(r["timestamp"][:10] for r in sel)
    sel = [r for r in sel if r["timestamp"][:10] == latest]
    # ... and one size: the N*C with the most rows (the sweep's, not a single small-C point)
    sizes = {}
    for r in sel:
        sizes.setdefault(int(round(np.log2(int(r["N"]) * int(r["C"])))), []).append(r)
    total_log2 = max(sizes, key=lambda k: (len(sizes[k]), k))
    sel = sizes[total_log2]
    total = 2**total_log2
    ce = load_providers("ce")
    provs = [p for p in ("copy",) + ce.NAMES + ce.CPU_NAMES if any(r["provider"] == p for r in sel)]
    date = max(r["timestamp"] for r in sel)[:10]
    head = (f"{gpu_name}, {dtype}, N·C ≈ 2^{int(round(np.log2(total)))}, measured {date} "
            f"(p50 ms; × = fraction of the copy's bandwidth)\n\n")
    lines = ["| C | " + " | ".join(provs) + " |", "|---:|" + "---:|" * len(provs)]
    for c in sorted({int(r["C"]) for r in sel}):
        cells = []
        for p in provs:
            r = next((r for r in sel if r["provider"] == p and int(r["C"]) == c), None)
            if r is None or not r["p50_ms"]:
                cells.append("–")
            elif p == "copy":
                cells.append(f"{float(r['p50_ms']):.3f}")
            else:
                star = "*" if _caveat(r) else ""
                cells.append(f"{float(r['p50_ms']):.3f} ({float(r['frac_of_copy']):.2f}×){star}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    variants = sorted({r["note"].split(";")[0] for r in sel if r["provider"] == "gpuce-fused" and r["note"]})
    tail = f"\n\nFused variants that ran: {', '.join(variants)}." if variants else ""
    caveats = sorted({_caveat(r) for r in sel if r["provider"] in provs and _caveat(r)})
    if caveats:
        tail += "\n\n* " + " ".join(f"{c}." for c in caveats)
    return head + "\n".join(lines) + tail


def _caveat(row) -> str:
    """What a row's note says after the variant name ("variant; caveat")."""
    return row["note"].split(";", 1)[1].strip() if ";" in row["note"] else ""


def update_readme(readme: Path, text: str, section: str = "bench") -> bool:
    """Replace the text between ``<!-- {section}:start -->`` and ``<!-- {section}:end -->``."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    s = readme.read_text()
    pat = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pat.search(s):
        return False
    readme.write_text(pat.sub(lambda _: f"{start}\n{text}\n{end}", s))
    return True


def fixed_marginal(rows, gpu_name: str, dtype="float32"):
    """Fit t = a + b * (N*C) through the two largest sizes of each (provider, C): the fixed
    part ``a`` (ms, host work and launch gaps a user pays per call) and the marginal part as
    a fraction of the copy's marginal time.  Returns a list of dicts."""
    sel = [r for r in rows if r["gpu_name"] == gpu_name and r["dtype"] == dtype and r.get("p50_ms")]
    out = []
    for prov in sorted({r["provider"] for r in sel}):
        for c in sorted({int(r["C"]) for r in sel if r["provider"] == prov}):
            pts = sorted((int(r["N"]) * c, float(r["p50_ms"])) for r in sel
                         if r["provider"] == prov and int(r["C"]) == c)
            cp_ = sorted((int(r["N"]) * c, float(r["p50_ms"])) for r in sel
                         if r["provider"] == "copy" and int(r["C"]) == c)
            if len(pts) < 2 or len(cp_) < 2:
                continue
            (s1, t1), (s2, t2) = pts[-2], pts[-1]
            (_, c1), (_, c2) = cp_[-2], cp_[-1]
            if s2 == s1:
                continue
            b = (t2 - t1) / (s2 - s1)
            bc = (c2 - c1) / (s2 - s1)
            out.append({"provider": prov, "C": c, "fixed_ms": t1 - b * s1,
                        "marginal_frac_of_copy": bc / b if b > 0 else float("nan")})
    return out


def _provider(text: str) -> str:
    """A --providers name: one of the CE providers' NAMES, or a pinned fused variant
    ``fused[...]``."""
    names = load_providers("ce").NAMES
    if text in names or (text.startswith("fused[") and text.endswith("]")):
        return text
    raise argparse.ArgumentTypeError(f"unknown provider {text!r}; known: {', '.join(names)} "
                                     "(and fused[<variant>] with --variants)")


def parse_count(text: str) -> int:
    """A positive count written as ``1048576``, ``2**30``, ``2^30`` or ``1e6`` (no eval)."""
    t = str(text).strip().replace("^", "**")
    try:
        if "**" in t:
            base, exp = t.split("**", 1)
            v = int(base) ** int(exp)
        else:
            v = int(float(t)) if any(ch in t for ch in ".eE") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 4096, 2**30 or 1e6, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive count, got {text!r}")
    return v


# ------------------------------------------------------------------------------ entry point

def main(argv=None) -> int:
    from ._help import plain_text

    p = argparse.ArgumentParser(prog="gpuce bench", description=plain_text(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=parse_count, nargs="+", default=list(CLASSES),
                   help="class counts C of the sweep (positive)")
    p.add_argument("--totals", type=parse_count, nargs="+", default=list(TOTALS),
                   help="N*C values, e.g. 2**28 2**30")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=BENCH_DTYPES,
                   metavar="DTYPE",
                   help="logits dtypes (float16, bfloat16, float32, float64); the first one's table is printed")
    p.add_argument("--providers", nargs="+", default=None, type=_provider,
                   help="only these providers (names as in the CSV: " + ", ".join(load_providers("ce").NAMES) + ")")
    p.add_argument("--repeat", type=parse_count, default=20, help="timed calls a point (after 2 warm-ups)")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="where the CSV and the plot go (default: bench/results of the source tree; "
                        "with --dry a new temporary directory)")
    p.add_argument("--readme", type=Path, default=None, help="regenerate this README's table")
    p.add_argument("--dry", action="store_true", help="no GPU: NumPy providers, tiny sizes")
    p.add_argument("--merge", type=Path, default=None,
                   help="record the rows of a CSV measured elsewhere (e.g. on a lent GPU) instead "
                        "of measuring; redraws the plot and, with --readme, the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")
    p.add_argument("--rows", type=parse_count, default=None,
                   help="a fixed N for every C (e.g. 2**24) instead of N = total // C")
    p.add_argument("--variants", action="store_true",
                   help="also time every other fused variant that can run each shape")
    p.add_argument("--softcap", type=float, default=None,
                   help="cap the logits at S tanh(f / S) in every provider (Gemma: 30); rows get op "
                        "softmax_cross_entropy_softcapS")
    a = p.parse_args(argv)
    if a.softcap is not None and not (math.isfinite(a.softcap) and a.softcap > 0):
        p.error(f"--softcap must be a finite number > 0, got {a.softcap}")
    if a.merge and not a.merge.is_file():
        p.error(f"--merge: no such file: {a.merge}")
    if not (a.dry or a.merge):
        from ._help import why_no_gpu

        missing = why_no_gpu()
        if missing is not None:
            p.error(f"no GPU to measure on: {missing}; --dry checks the harness on the CPU")
    if a.dry and a.results_dir is None:
        # a dry run never writes into the source tree: a temporary directory, removed after
        import tempfile

        with tempfile.TemporaryDirectory(prefix="gpuce-bench-dry-") as tmp:
            print(f"gpuce bench --dry: results in a temporary directory, removed at the end "
                  f"(pass --results-dir to keep them)")
            return _run(a, Path(tmp))
    return _run(a, a.results_dir or default_results_dir())


def _run(a, results: Path) -> int:
    """The sweep (or the merge) of ``gpuce bench``'s parsed arguments, into ``results``."""
    if a.merge:
        rows = read_rows(a.merge)
        if not rows:
            raise SystemExit(f"{a.merge} has no rows")
        name = rows[0]["gpu_name"]
        csv_path = results / ("dry_sce.csv" if name.startswith("cpu:") else "gpu_sce.csv")
    elif a.dry:
        rows, name = cpu_sweep(a.classes if a.classes != list(CLASSES) else [10, 100, 1000],
                               [2**14], a.dtypes, max(2, min(a.repeat, 3)), note="dry run")
        csv_path = results / "dry_sce.csv"
    else:
        csv_path = results / "gpu_sce.csv"
        rows, name = gpu_sweep(a.classes, a.totals, a.dtypes, a.repeat, a.providers,
                               progress=not a.no_progress, on_rows=lambda r: upsert(csv_path, r),
                               variants=a.variants, rows=a.rows, softcap=a.softcap)
    upsert(csv_path, rows)
    all_rows = read_rows(csv_path)
    txt = table(all_rows, name, a.dtypes[0])
    print(txt)
    for d in a.dtypes:
        split = fixed_marginal(all_rows, name, d)
        if split:
            print(f"\nfixed / marginal split ({d}, two largest N*C):")
            for r in split:
                print(f"  {r['provider']:>16} C={r['C']:>7}: fixed {r['fixed_ms']:.3f} ms, "
                      f"marginal {r['marginal_frac_of_copy']:.2f} of the copy")
    try:
        png = plot(all_rows, csv_path.with_suffix(".png"), name, a.dtypes[0])
        if png:
            print("plot:", png)
    except ImportError:
        print("plot: matplotlib not installed")
    print("csv:", csv_path)
    if a.readme:
        print("README table updated" if update_readme(a.readme, txt) else
              f"README has no {README_START} ... {README_END} section")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
