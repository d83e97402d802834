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
    assert set(ce.cpu_providers()) == set(ce.CPU_NAMES)
    assert B.load_providers("lce").OP == "linear_ce"
    with pytest.raises(FileNotFoundError, match="no benchmark providers for 'nope'"):
        B.load_providers("nope")


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
