"""One dispatch point: every public array function decides its backend through
gpuce._dispatch.backends (dask form, else the in-memory function and its array_module)."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest

import gpuce
from gpuce._dispatch import backends

PUBLIC = ["softmax", "log_softmax", "logsumexp", "entropy", "cross_entropy", "kl_div",
          "softmax_cross_entropy", "linear_cross_entropy"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_function_goes_through_backends(name):
    fn = getattr(gpuce, name)
    assert callable(fn.in_memory) and fn.__wrapped__ is fn.in_memory
    # the in-memory function is found by name: pickled by reference for dask workers
    assert pickle.loads(pickle.dumps(fn.in_memory)) is fn.in_memory


def test_no_other_dask_test_in_the_function_modules():
    """The function modules never ask "is this a dask array?" themselves."""
    for module in ("sce", "linear", "softmax", "information"):
        tree = ast.parse((ROOT / "gpuce" / f"{module}.py").read_text(encoding="utf-8"))
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert "is_dask_array" not in names, module


def test_backends_routes_by_the_named_parameters():
    da = pytest.importorskip("dask.array")
    calls = []

    @backends("x", "y", dask=lambda run, arguments: ("dask", run, arguments))
    def f(x, y=None, *, w=None, scale=1.0):
        calls.append("memory")
        return "memory"

    xd = da.zeros(3, chunks=1)
    assert f(np.zeros(3)) == "memory"
    assert f(np.zeros(3), w=xd) == "memory"  # w is not one of the named parameters
    kind, run, arguments = f(np.zeros(3), y=xd, scale=2.0)
    assert kind == "dask" and run is f.in_memory
    assert arguments["y"] is xd and arguments["w"] is None and arguments["scale"] == 2.0
    assert f(xd)[0] == "dask"
    assert calls == ["memory", "memory"]


def test_dask_form_runs_the_in_memory_function_on_blocks():
    da = pytest.importorskip("dask.array")
    x = np.random.default_rng(0).standard_normal((6, 4))
    got = gpuce.softmax(da.from_array(x, chunks=(2, 4))).compute(scheduler="sync")
    np.testing.assert_allclose(got, gpuce.softmax(x), rtol=1e-12)
    with pytest.raises(ValueError, match="grad_row_scale is not supported for dask"):
        gpuce.linear_cross_entropy(da.from_array(x, chunks=(2, 4)), np.zeros((3, 4)), np.zeros(6, int),
                                   reduction="none", grad_row_scale=np.ones(6))
