"""kernels/ reaches the built wheel, and an installed copy finds and compiles it."""

import subprocess
import sys
import zipfile

import pytest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("hatchling")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(root)], check=True)
    (whl,) = out.glob("gpuce-*.whl")
    return whl


def test_wheel_contains_kernels(wheel):
    from gpuce._cuda import source

    names = zipfile.ZipFile(wheel).namelist()
    shipped = {p.name for p in source.all_sources()}
    assert shipped
    for name in shipped:
        assert f"gpuce/kernels/{name}" in names


def _install(wheel, tmp_path):
    """The wheel installed into a folder of its own (put first on sys.path by the callers)."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
    return target


def test_installed_copy_uses_its_own_kernels(wheel, tmp_path):
    target = _install(wheel, tmp_path)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import gpuce, gpuce._cuda.source as ks\n"
        "d = ks.kernel_dir(); assert str(d).startswith(sys.argv[1]), d\n"
        "print(ks.read_source('gpuce_rowstat.cuh')[:10])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("//")


def test_wheel_carries_the_benchmark_providers(wheel):
    from gpuce import benchmark

    names = zipfile.ZipFile(wheel).namelist()
    for f in sorted(benchmark.provider_dir().glob("providers_*.py")):
        assert f"gpuce/bench_providers/{f.name}" in names


def test_installed_copy_benchmarks_with_its_own_providers(wheel, tmp_path):
    """`gpuce bench --dry` from an installed wheel (no source tree on the path) loads the
    providers the wheel carries and writes its CSV."""
    pytest.importorskip("matplotlib")
    target = _install(wheel, tmp_path)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import csv, gpuce.benchmark as B\n"
        "d = B.provider_dir(); assert str(d).startswith(sys.argv[1]), d\n"
        "ce = B.load_providers('ce'); assert ce.__file__.startswith(sys.argv[1]), ce.__file__\n"
        "assert B.load_providers('lce').OP == 'linear_ce'\n"
        "import numpy; print('names', *ce.NAMES, *sorted(ce.providers(numpy)))\n"
        "assert B.main(['--dry', '--results-dir', sys.argv[2], '--no-progress', '--classes', '10']) == 0\n"
        "rows = list(csv.DictReader(open(sys.argv[2] + '/dry_sce.csv')))\n"
        "print(sorted({r['provider'] for r in rows}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(target), str(tmp_path / "res")], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "['copy', 'gpuce-numpy']" in out.stdout
    assert "names gpuce-fused gpuce-portable naive-cupy torch-eager torch-compile liger gpuce-numpy" in out.stdout
