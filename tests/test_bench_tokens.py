"""The token log-probability benchmark on the CPU: bench/providers_tokens.py's interface,
bench/bench_tokens.py in dry mode (its CSV), and gpuce's outputs against the torch reference's
at a tiny shape (so the benchmark times the same quantities)."""

import csv
import importlib.util
import subprocess
import sys
import types

import numpy as np
import pytest

from gpuce import benchmark as B


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _inputs(n=24, d=16, v=300, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    W = (rng.standard_normal((v, d)) / np.sqrt(d)).astype(np.float32)
    y = rng.integers(0, v, n).astype(np.int64)
    return X, W, y


def test_provider_file_has_the_interface():
    mod = B.load_providers("tokens")
    assert mod.OP == "tokens" and isinstance(mod.NAMES, tuple)
    assert {"gemms", "gpuce", "gpuce-torch", "torch", "torch-compile", "liger"} == set(mod.NAMES)
    X, W, y = _inputs()
    fake_cp = types.SimpleNamespace()  # not NumPy: only the callables are built
    assert set(mod.providers(fake_cp, None, X=X, W=W, y=y, backward=False)) == {"gemms", "gpuce"}
    for backward in (False, True):
        got = mod.providers(np, None, X=X, W=W, y=y, temperature=0.7, backward=backward)
        assert set(got) == {"gemms", "gpuce"} and all(callable(f) for f in got.values())


def test_torch_providers_are_there_when_their_libraries_are():
    torch = pytest.importorskip("torch")
    import gpuce.torch as gt

    mod = B.load_providers("tokens")
    X, W, y = _inputs()
    got = set(mod.providers(np, torch, X=X, W=W, y=y, backward=True))
    assert {"gemms", "gpuce", "torch", "torch-compile"} <= got <= set(mod.NAMES)
    assert ("gpuce-torch" in got) == hasattr(gt, "linear_token_logprobs")
    assert ("liger" in got) == (importlib.util.find_spec("liger_kernel") is not None)


def test_provider_file_imports_neither_cupy_nor_torch():
    code = ("import sys, gpuce.benchmark as B\n"
            "B.load_providers('tokens')\n"
            "print('cupy' in sys.modules, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_dry_run_writes_the_csv(tmp_path, capsys):
    import bench.bench_tokens as bt

    path = tmp_path / "tokens_cpu.csv"
    names = ["gemms", "gpuce"] + (["torch"] if _torch() is not None else [])
    argv = ["--dry", "--shape", "32", "16", "300", "--repeat", "2", "--csv", str(path),
            "--providers", *names]
    assert bt.main(argv) == 0
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == B.FIELDS
        rows = list(reader)
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in names for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["op"] == "tokens" and r["dtype"] == "float32" and r["gpu_name"].startswith("cpu:")
        assert (int(r["N"]), int(r["C"])) == (32, 300)
        assert 0 < float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert float(r["gbps"]) > 0
        assert bt.note_value(r, "D") == 16 and bt.note_value(r, "tau") == 0.7
        assert bt.note_value(r, "logits_mib") == pytest.approx(32 * 300 * 4 / 2**20, abs=0.01)
        if sys.platform.startswith("linux"):
            assert float(r["peak_extra_mib"]) >= 0
    fb = next(r for r in rows if r["mode"] == "fwd+bwd")
    assert bt.note_value(fb, "out_mib") == pytest.approx(((32 + 300) * 16 * 4 + 8 * 32) / 2**20, abs=1e-3)
    assert "| gpuce |" in capsys.readouterr().out
    bt.main(argv)  # a second run replaces its rows
    assert len(B.read_rows(path)) == len(rows)


def test_plot_draws_a_column_a_mode(tmp_path):
    pytest.importorskip("matplotlib")
    import bench.bench_tokens as bt

    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for v, t in ((8192, 1.0), (32768, 4.0)):
            rows.append(dict(provider="gpuce", mode=mode, dtype="float32", N=256, C=v, gpu_name="cpu:x",
                             p50_ms=str(t), peak_extra_mib="3.0", note=f"D=256; logits_mib={256 * v * 4 / 2**20}"))
    rows.append(dict(provider="liger", mode="fwd", dtype="float32", N=256, C=8192, gpu_name="cpu:x",
                     note="D=256; logits_mib=8; failed: ImportError"))
    assert bt.plot(rows, tmp_path / "t.png") == 2 and (tmp_path / "t.png").stat().st_size > 1000


@pytest.mark.parametrize("backward", [False, True])
def test_gpuce_and_the_torch_reference_compute_the_same(backward):
    """log p, H and (with the backward) dX, dW of Σ log p + 0.1 Σ H: gpuce, the materialised
    torch reference and its compiled form agree at a tiny float32 shape."""
    torch = pytest.importorskip("torch")
    mod = B.load_providers("tokens")
    X, W, y = _inputs()
    got = mod.providers(np, torch, X=X, W=W, y=y, temperature=0.7, backward=backward)
    names = ["torch", "torch-compile"] + (["gpuce-torch"] if "gpuce-torch" in got else [])
    if backward:
        logp, h, grads = got["gpuce"]()
        want = (logp, h, grads.X, grads.W)
    else:
        want = got["gpuce"]()
    assert len(want) == (4 if backward else 2)
    for name in names:
        out = got[name]()
        flat = (*out[0], out[1], out[2]) if backward else out
        for a, b in zip(want, flat):
            np.testing.assert_allclose(b.detach().numpy(), a, rtol=2e-5, atol=2e-5, err_msg=name)
    # and against float64 arithmetic written out here
    u = (X.astype(np.float64) @ W.T.astype(np.float64)) / 0.7
    lse = np.log(np.exp(u - u.max(1, keepdims=True)).sum(1)) + u.max(1)
    q = np.exp(u - lse[:, None])
    np.testing.assert_allclose(want[0], u[np.arange(len(y)), y] - lse, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(want[1], lse - (q * u).sum(1), rtol=1e-5, atol=1e-5)
