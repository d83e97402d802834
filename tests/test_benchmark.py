"""The benchmark harness in dry mode (no GPU): tidy CSV upserts, plot and README table."""

import csv

import pytest

from gpuce import benchmark as B


def test_dry_run_writes_csv_plot_and_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert B.main(["--dry", "--results-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "dry_sce.csv")))
    assert {r["provider"] for r in rows} == {"copy", "gpuce-numpy"}
    assert {int(r["C"]) for r in rows} == {10, 100, 1000}
    for r in rows:
        assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert float(r["gbps"]) > 0 and r["gpu_name"].startswith("cpu:")
    assert (tmp_path / "dry_sce.png").stat().st_size > 1000
    assert "| 1000 |" in out and "gpuce-numpy" in out
    # a second run upserts: same keys, no duplicate rows
    B.main(["--dry", "--results-dir", str(tmp_path), "--no-progress"])
    rows2 = list(csv.DictReader(open(tmp_path / "dry_sce.csv")))
    assert len(rows2) == len(rows)


def test_merge_and_readme_table(tmp_path):
    gpu = "NVIDIA H100 80GB HBM3"
    rows = []
    for c, t_copy, t_fused in ((1000, 1.0, 1.1), (32768, 1.0, 1.05)):
        n = 2**20 // c
        rows.append(B._row("copy", "copy", "full", "float32", n, c, gpu, (t_copy,) * 3, 8 * n * c,
                           (t_copy,) * 3, 0.0, ""))
        rows.append(B._row("softmax_cross_entropy", "gpuce-fused", "full", "float32", n, c, gpu,
                           (t_fused,) * 3, 8 * n * c, (t_copy,) * 3, 12.0, "smem-v4"))
    src = B.upsert(tmp_path / "measured.csv", rows)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{B.README_START}\nold\n{B.README_END}\nend\n")
    B.main(["--merge", str(src), "--results-dir", str(tmp_path / "res"), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and gpu in text and "| 32768 | 1.000 | 1.050 (0.95×) |" in text
    assert "smem-v4" in text and text.startswith("intro") and text.endswith("end\n")
    assert (tmp_path / "res" / "gpu_sce.csv").exists()


@pytest.mark.gpu
def test_lce_benchmark_dry_run(tmp_path):
    """bench/bench_lce.py on two small shapes: the CuPy providers give a time and a peak, a
    chunk size at or above a shape's N is left out, and the plot is drawn."""
    import bench.bench_lce as lce

    rows = lce.run(["float32"], 2, [64, 1024], [(512, 128, 4096), (1024, 64, 300)], dry=True)
    for n in (512, 1024):
        got = {r["provider"]: r for r in rows if r["N"] == n}
        assert {"three-gemms", "gpuce", "gpuce[chunk=64]"} <= set(got)
        assert ("gpuce[chunk=1024]" in got) == (n > 1024)
        for name in ("three-gemms", "gpuce", "gpuce[chunk=64]"):
            assert float(got[name]["p50_ms"]) > 0 and float(got[name]["peak_extra_mib"]) > 0
    assert lce.plot(rows, tmp_path / "lce.png") == 2


def test_lce_plot_has_a_panel_a_shape_and_dtype(tmp_path):
    """The time-against-memory plot from rows as bench_lce writes them (failed providers, which
    have no time, are left out)."""
    pytest.importorskip("matplotlib")
    import bench.bench_lce as lce

    note = "D=64; lower_bound_mib=10.0; mem_ratio=1.0; time_ratio_to_3gemms=1.0"
    rows = [dict(provider=p, dtype=dt, N=n, C=300, gpu_name="GPU", p50_ms="1.5", peak_extra_mib="12", note=note)
            for p in ("gpuce", "three-gemms") for dt in ("float32", "bfloat16") for n in (512, 1024)]
    rows.append(dict(provider="cce", dtype="float32", N=512, C=300, gpu_name="GPU", note="D=64; failed: TypeError"))
    assert lce.plot(rows, tmp_path / "lce.png") == 4  # (512, 1024) x (float32, bfloat16)
    assert (tmp_path / "lce.png").stat().st_size > 0


def test_providers_are_found_one_file_an_op():
    """The source tree's bench/providers_<op>.py, loaded by path once a process; an op with no
    file is a clear error."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert B.provider_dir() == root / "bench"
    ce = B.load_providers("ce")
    assert Path(ce.__file__) == root / "bench" / "providers_ce.py" and B.load_providers("ce") is ce
    assert ce.OP == "softmax_cross_entropy" and "gpuce-fused" in ce.NAMES and "liger" in ce.NAMES
    assert B.load_providers("lce").OP == "linear_ce"
    with pytest.raises(FileNotFoundError, match="no benchmark providers for 'nope'"):
        B.load_providers("nope")


def test_a_wheels_provider_folder_is_looked_in_first(tmp_path, monkeypatch):
    """The wheel's layout (gpuce/bench_providers/ beside gpuce/benchmark.py) wins over a bench/
    folder next to the package; with neither the error names both places."""
    pkg = tmp_path / "gpuce"
    for d in (pkg / "bench_providers", tmp_path / "bench"):
        d.mkdir(parents=True)
        (d / "providers_ce.py").write_text("OP = 'x'\n")
    monkeypatch.setattr(B, "_PKG_DIR", pkg)
    assert B.provider_dir() == pkg / "bench_providers"
    (pkg / "bench_providers" / "providers_ce.py").unlink()
    assert B.provider_dir() == tmp_path / "bench"
    (tmp_path / "bench" / "providers_ce.py").unlink()
    with pytest.raises(FileNotFoundError, match="bench_providers"):
        B.provider_dir()


def test_every_provider_file_has_the_same_interface():
    """OP, NAMES and providers(xp, torch, **options) -> {name: callable}, the names among NAMES
    (callables are only built here: nothing runs, no GPU needed)."""
    import re
    import types

    import numpy as np

    files = sorted(B.provider_dir().glob("providers_*.py"))
    assert {f.stem for f in files} >= {"providers_ce", "providers_lce"}
    for f in files:
        mod = B.load_providers(f.stem.removeprefix("providers_"))
        assert isinstance(mod.OP, str) and mod.OP and isinstance(mod.NAMES, tuple) and mod.NAMES
        assert callable(mod.providers)
    ce, lce = B.load_providers("ce"), B.load_providers("lce")
    fake_cp = types.SimpleNamespace()  # not NumPy: the GPU providers
    assert set(ce.providers(np)) == set(ce.CPU_NAMES) == {"gpuce-numpy"}
    assert set(ce.providers(fake_cp, None)) == {"gpuce-fused", "gpuce-portable", "naive-cupy"}
    assert set(ce.providers(fake_cp, None, softcap=30.0)) == {"gpuce-fused", "gpuce-portable"}
    assert set(ce.providers(fake_cp, None)) <= set(ce.NAMES)
    got = lce.providers(fake_cp, None, X=None, W=None, y=None, chunks=[64, 256])
    assert set(got) == {"three-gemms", "gpuce", "gpuce[chunk=64]", "gpuce[chunk=256]"}
    assert all(n in lce.NAMES or re.fullmatch(r"gpuce\[chunk=\d+\]", n) for n in got)


def test_cpu_sweep_runs_the_provider_module_it_is_given():
    import types

    toy = types.SimpleNamespace(OP="toy_op", NAMES=("toy",),
                                providers=lambda xp: {"toy": lambda x, y: xp.exp(x).sum()})
    rows, name = B.cpu_sweep([10, 100], [2**10], ["float32"], 2, note="toy", module=toy)
    assert name == B.cpu_name()
    assert sorted((r["op"], r["provider"], r["C"]) for r in rows) == [
        ("copy", "copy", 10), ("copy", "copy", 100), ("toy_op", "toy", 10), ("toy_op", "toy", 100)]
    assert all(float(r["p50_ms"]) > 0 and r["note"] == "toy" for r in rows)


def test_providers_import_neither_cupy_nor_torch():
    import subprocess
    import sys

    code = ("import sys, gpuce.benchmark as B\n"
            "B.load_providers('ce'); B.load_providers('lce')\n"
            "print('cupy' in sys.modules, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unknown_provider_names_the_known_ones(capsys):
    with pytest.raises(SystemExit):
        B.main(["--dry", "--providers", "nope"])
    err = capsys.readouterr().err
    assert "unknown provider 'nope'" in err and "gpuce-fused" in err


def test_cpu_sweep_takes_bfloat16_by_name():
    """``--dry --dtypes bfloat16`` (a name NumPy alone does not know: ml_dtypes')."""
    rows, _ = B.cpu_sweep([100], [2**10], ["bfloat16"], 2)
    assert {(r["provider"], r["dtype"]) for r in rows} == {("copy", "bfloat16"), ("gpuce-numpy", "bfloat16")}
