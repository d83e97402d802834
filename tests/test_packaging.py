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


def test_installed_copy_uses_its_own_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
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
