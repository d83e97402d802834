"""The ``gpuce`` command: help on every option, no eval, ``bench --dry`` outside the source tree,
``check-kernels``' verdict and exit code (the spill rule of gpuce._cuda.checks), the demo's
backend messages and its quiet progress off a terminal."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import numpy as np
import pytest

from gpuce import cli
from gpuce._cuda import checks
from gpuce._cuda.nvrtc import CompileResult

ROOT = Path(__file__).resolve().parent.parent


def _actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield f"{parser.prog} {choice.dest}", choice
            for sub in action.choices.values():
                yield from _actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield f"{parser.prog} {'/'.join(action.option_strings) or action.dest}", action


def test_every_option_has_help():
    seen = dict(_actions(cli.build_parser()))
    assert "gpuce demo --backend" in seen and "gpuce check-kernels --arch" in seen
    missing = [name for name, action in seen.items() if not action.help]
    assert not missing, f"options without help text: {missing}"


def test_no_eval_in_gpuce():
    calls = []
    for path in sorted((ROOT / "gpuce").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not calls, f"eval/exec in gpuce: {calls}"


def test_bench_dry_writes_to_a_temporary_directory_it_removes(monkeypatch, capsys, tmp_path):
    from gpuce import benchmark

    def refuse():
        raise AssertionError("gpuce bench --dry must not write into the source tree")

    seen = []
    real_run = benchmark._run

    def run(a, results):
        seen.append(results)
        code = real_run(a, results)
        assert (results / "dry_sce.csv").exists()  # written while the run lasts
        return code

    monkeypatch.setattr(benchmark, "default_results_dir", refuse)
    monkeypatch.setattr(benchmark, "_run", run)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert cli.main(["bench", "--dry", "--classes", "10", "--repeat", "2"]) == 0
    assert "removed at the end" in capsys.readouterr().out
    assert len(seen) == 1 and seen[0].parent == tmp_path
    assert list(tmp_path.iterdir()) == []  # nothing left behind


@pytest.mark.parametrize("argv,message", [
    (["--classes", "0"], "positive count"),
    (["--classes", "-5"], "positive count"),
    (["--classes", "ten"], "expected a count"),
    (["--dtypes", "float8"], "invalid choice: 'float8'"),
    (["--providers", "nosuch"], "unknown provider 'nosuch'"),
    (["--repeat", "0"], "positive count"),
    (["--softcap", "-1"], "softcap must be a finite number > 0"),
    (["--merge", "/nonexistent/rows.csv"], "no such file"),
])
def test_bench_bad_arguments_get_one_line_before_any_work(monkeypatch, capsys, argv, message):
    from gpuce import benchmark

    def refuse(*a, **k):
        raise AssertionError("no work may start on bad arguments")

    monkeypatch.setattr(benchmark, "_run", refuse)
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--dry", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gpuce bench: error:") and message in err


def test_bench_without_a_gpu_says_so_and_names_dry(monkeypatch, capsys):
    from gpuce import _help, benchmark

    monkeypatch.setattr(_help, "why_no_gpu", lambda: "CuPy is installed but sees no GPU")
    monkeypatch.setattr(benchmark, "_run", lambda *a: pytest.fail("measured without a GPU"))
    with pytest.raises(SystemExit):
        cli.main(["bench", "--classes", "10"])
    err = capsys.readouterr().err
    assert "no GPU to measure on" in err and "--dry" in err and "Traceback" not in err


def test_demo_checks_the_png_path_before_training(monkeypatch, tmp_path):
    from gpuce import _demo

    monkeypatch.setattr(_demo, "train_digits", lambda *a, **k: pytest.fail("trained first"))
    with pytest.raises(SystemExit, match="no such directory"):
        cli.main(["demo", "--backend", "numpy", "--png", str(tmp_path / "missing" / "x.png")])
    with pytest.raises(SystemExit, match="cannot write"):
        cli.main(["demo", "--backend", "numpy", "--png", str(tmp_path)])


def test_check_kernels_without_cupy_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "cupy.cuda", None)
    assert cli.main(["check-kernels"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("check-kernels: FAILED: cannot compile") and "pip install" in out
    assert "Traceback" not in out


def test_help_has_no_rest_markup(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out


def test_bench_dry_into_a_given_directory(capsys, tmp_path):
    assert cli.main(["bench", "--dry", "--classes", "10", "--repeat", "2", "--results-dir", str(tmp_path)]) == 0
    assert (tmp_path / "dry_sce.csv").exists()


def test_bench_off_a_terminal_adds_no_progress(monkeypatch):
    from gpuce import benchmark

    seen = []
    monkeypatch.setattr(benchmark, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    cli.main(["bench", "--classes", "10"])
    cli.main(["bench", "--help"])
    assert seen == [["--classes", "10", "--no-progress"], ["--help"]]


# ---------------------------------------------------------------- the spill rule and check-kernels

def _result(name, arch, spills, stack=None, lowered=None, registers=None):
    regs = {fn: 40 for fn in spills} if registers is None else registers
    return CompileResult(name, arch, "", regs, spills, stack or {fn: 0 for fn in spills}, lowered)


def test_spill_rule():
    fused = "gpuce_sce_fused_sm_90"
    lowered = {"sce_block<float, float, int>": "_Zf", "sce_block<double, double, int>": "_Zd"}
    ok = [
        _result(fused, "sm_90", {"_Zf": (0, 0), "_Zd": (128, 128)}, {"_Zf": 0, "_Zd": 128}, lowered),
        _result("gpuce_sce_stats_f32", "sm_80", {"k": (16, 16)}),  # sm_80: not checked for specs
        _result("gpuce_sce_stats_f32", "sm_90", {"k": (0, 0)}, {"k": 32}),
    ]
    assert checks.violations(ok) == []
    bad = [
        _result(fused, "sm_80", {"_Zf": (4, 0), "_Zd": (0, 0)}, None, lowered),  # float: 0 B
        _result(fused, "sm_90", {"_Zf": (0, 0), "_Zd": (0, 132)}, None, lowered),  # double: 128 B
        _result(fused, "sm_90", {"_Zf": (0, 0), "_Zd": (0, 0)}, {"_Zf": 8, "_Zd": 0}, lowered),  # stack
        _result("gpuce_sce_stats_f32", "sm_90", {"k": (0, 4)}),
        _result("gpuce_sce_grad_f32", "sm_90", {}, registers={}),  # no ptxas report
    ]
    found = checks.violations(bad)
    assert [(v.program, v.arch, v.entry) for v in found] == [
        (fused, "sm_80", "sce_block<float, float, int>"),
        (fused, "sm_90", "sce_block<double, double, int>"),
        (fused, "sm_90", "sce_block<float, float, int>"),
        ("gpuce_sce_stats_f32", "sm_90", "k"),
        ("gpuce_sce_grad_f32", "sm_90", "gpuce_sce_grad_f32"),
    ]
    assert "budget 128 B" in str(found[1]) and "no ptxas report" in found[4].why


def _fake_jobs(results):
    return lambda archs: [(f"{r.name} {r.arch}", lambda r=r: [r]) for r in results]


def test_check_kernels_verdict_ok(monkeypatch, capsys):
    monkeypatch.setattr(checks, "compile_jobs",
                        _fake_jobs([_result("gpuce_sce_stats_f32", a, {"k": (0, 0)}) for a in ("sm_80", "sm_90")]))
    assert cli.main(["check-kernels"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1].startswith("check-kernels: OK: 2 kernel entries in 2 NVRTC programs")
    assert "[1/2] gpuce_sce_stats_f32 sm_80" in err and "[2/2]" in err  # progress (not a TTY)


def test_check_kernels_verdict_failed(monkeypatch, capsys):
    monkeypatch.setattr(checks, "compile_jobs",
                        _fake_jobs([_result("gpuce_sce_stats_f32", "sm_90", {"k": (8, 8)})]))
    assert cli.main(["check-kernels", "--arch", "sm_90"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("check-kernels: FAILED: 1 of 1 kernel entries")
    assert any(line.startswith("over budget: k (gpuce_sce_stats_f32, sm_90)") for line in lines)


def test_check_kernels_compile_error(monkeypatch, capsys):
    def broken():
        raise RuntimeError("NVRTC failed on x for sm_90: ...")

    monkeypatch.setattr(checks, "compile_jobs", lambda archs: [("x sm_90", broken)])
    assert cli.main(["check-kernels", "--arch", "sm_90"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "check-kernels: FAILED: x sm_90 does not compile"


def test_compile_jobs_cover_compile_all():
    """The CLI compiles the programs compile_all does (labels only: nothing is compiled here)."""
    pytest.importorskip("cupy")
    from gpuce._cuda import kernels, source

    jobs = checks.compile_jobs(("sm_80", "sm_90"))
    n_specs = sum(len(s.specializations) for s in kernels.SPECS.values())
    n_raw = len([p for p in source.all_sources() if p.suffix == ".cu"])
    assert len(jobs) == 2 * n_specs + 2 * n_raw
    labels = [label for label, _ in jobs[2 * n_specs:]]
    for prefix in ("gpuce_sce_fused_", "gpuce_tokens_", "gpuce_distill_"):
        assert [label.split()[0] for label in labels if label.startswith(prefix)] == \
            [f"{prefix}sm_80", f"{prefix}sm_90"]


# ------------------------------------------------------------------------------- the demo

def test_demo_says_cupy_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    xp, label = cli._best_backend("auto")
    assert xp is np and "CuPy is not installed" in label
    with pytest.raises(SystemExit, match="--backend cupy asked for, but CuPy is not installed"):
        cli._best_backend("cupy")


def test_demo_says_no_gpu_is_visible(monkeypatch):
    cupy = pytest.importorskip("cupy")

    def no_device():
        raise cupy.cuda.runtime.CUDARuntimeError(100)  # cudaErrorNoDevice

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", no_device)
    xp, label = cli._best_backend("auto")
    assert xp is np and "CuPy is installed but sees no GPU" in label
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 0)
    with pytest.raises(SystemExit, match="CuPy is installed but sees no GPU"):
        cli._best_backend("cupy")


def test_demo_quiet_off_a_terminal_and_plots_the_gap(monkeypatch, tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    from gpuce import _demo

    import matplotlib.axes

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    ylabels = []
    set_ylabel = matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel",
                        lambda self, text, *a, **k: ylabels.append(text) or set_ylabel(self, text, *a, **k))
    lines = []
    assert _demo.train_digits(np, "numpy (CPU)", png=str(tmp_path / "curve.png"), out=lines.append)
    assert capsys.readouterr().err == ""  # no progress bar
    assert any("accuracy" in line for line in lines)
    assert (tmp_path / "curve.png").exists()
    assert ylabels and ylabels[0].startswith("gap to the optimum")
