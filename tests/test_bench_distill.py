"""The distillation benchmarks on the CPU: bench/providers_distill.py's (the linear form) and
bench/providers_distill_logits.py's (the dense logits) interfaces, bench/bench_distill.py and
bench/bench_distill_logits.py in dry mode (their CSVs), and every provider's loss and student
gradients against float64 arithmetic written out here at a tiny shape (so the benchmarks time
the same quantities)."""

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


def _inputs(n=24, d=16, dt=12, v=300, seed=0):
    """Student (Xs (n, d), Ws (v, d)) and a teacher of another width (Xt (n, dt), Wt (v, dt))."""
    rng = np.random.default_rng(seed)
    Xs = rng.standard_normal((n, d)).astype(np.float32)
    Ws = (rng.standard_normal((v, d)) / np.sqrt(d)).astype(np.float32)
    Xt = rng.standard_normal((n, dt)).astype(np.float32)
    Wt = (rng.standard_normal((v, dt)) / np.sqrt(dt)).astype(np.float32)
    return dict(Xs=Xs, Ws=Ws, Xt=Xt, Wt=Wt)


def _float64_reference(Xs, Ws, Xt, Wt, beta, tau):
    """(loss, dXs, dWs) in float64: the mean over the rows of KL(p_T ‖ p_S) (β = 0),
    KL(p_S ‖ p_T) (β = 1) or β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M), M = β p_T + (1 − β) p_S;
    the gradient through the softmax of ∂L/∂p_S written out by hand."""
    def log_softmax(u):
        m = u.max(1, keepdims=True)
        return u - m - np.log(np.exp(u - m).sum(1, keepdims=True))

    Xs, Ws, Xt, Wt = (a.astype(np.float64) for a in (Xs, Ws, Xt, Wt))
    ls, lt = log_softmax(Xs @ Ws.T / tau), log_softmax(Xt @ Wt.T / tau)
    ps, pt = np.exp(ls), np.exp(lt)
    n = len(Xs)
    if beta == 0:
        rows = (pt * (lt - ls)).sum(1)
        du = ps - pt  # ∂/∂u of KL(p_T ‖ softmax(u))
    else:
        if beta == 1:
            rows = (ps * (ls - lt)).sum(1)
            a = ls - lt  # ∂L/∂p_S up to a constant a row (which the softmax removes)
        else:
            lm = np.log(beta * pt + (1 - beta) * ps)
            rows = beta * (pt * (lt - lm)).sum(1) + (1 - beta) * (ps * (ls - lm)).sum(1)
            a = (1 - beta) * (ls - lm)
        du = ps * (a - (ps * a).sum(1, keepdims=True))
    g = du / tau / n
    return rows.mean(), g @ Ws, g.T @ Xs


def test_provider_file_has_the_interface():
    mod = B.load_providers("distill")
    assert mod.OP == "distill" and isinstance(mod.NAMES, tuple)
    assert {"gemms", "gpuce", "gpuce-torch", "torch", "torch-compile", "liger"} == set(mod.NAMES)
    fake_cp = types.SimpleNamespace()  # not NumPy: only the callables are built
    assert set(mod.providers(fake_cp, None, **_inputs())) == {"gemms", "gpuce"}
    for beta in (0.0, 0.5, 1.0):
        got = mod.providers(np, None, **_inputs(), beta=beta, temperature=0.7)
        assert set(got) == {"gemms", "gpuce"} and all(callable(f) for f in got.values())
    ft, dX, dW = mod.providers(np, None, **_inputs())["gemms"]()
    assert ft.shape == (24, 300) and dX.shape == (24, 16) and dW.shape == (300, 16)


def test_torch_providers_are_there_when_their_libraries_are():
    torch = pytest.importorskip("torch")
    import gpuce.torch as gt

    mod = B.load_providers("distill")
    got = set(mod.providers(np, torch, **_inputs(), beta=0.5))
    assert {"gemms", "gpuce", "torch", "torch-compile"} <= got <= set(mod.NAMES)
    assert ("gpuce-torch" in got) == hasattr(gt, "linear_distillation_loss")
    if importlib.util.find_spec("liger_kernel") is None:
        assert "liger" not in got


def test_provider_file_imports_neither_cupy_nor_torch():
    code = ("import sys, gpuce.benchmark as B\n"
            "B.load_providers('distill')\n"
            "print('cupy' in sys.modules, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_dry_run_writes_the_csv(tmp_path, capsys):
    import bench.bench_distill as bd

    path = tmp_path / "distill_cpu.csv"
    names = ["gemms", "gpuce"] + (["torch"] if _torch() is not None else [])
    argv = ["--dry", "--shape", "32", "16", "300", "--repeat", "2", "--csv", str(path),
            "--temperature", "0.7", "--providers", *names]
    assert bd.main(argv) == 0
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == B.FIELDS
        rows = list(reader)
    modes = ("fwd+bwd:beta=0", "fwd+bwd:beta=0.5")
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in names for m in modes}
    for r in rows:
        assert r["op"] == "distill" and r["dtype"] == "float32" and r["gpu_name"].startswith("cpu:")
        assert (int(r["N"]), int(r["C"])) == (32, 300)
        assert 0 < float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert float(r["gbps"]) > 0
        assert bd.note_value(r, "D") == 16 and bd.note_value(r, "tau") == 0.7
        assert bd.note_value(r, "beta") == float(r["mode"].rpartition("=")[2])
        assert bd.note_value(r, "logits_mib") == pytest.approx(32 * 300 * 4 / 2**20, abs=0.01)
        assert bd.note_value(r, "out_mib") == pytest.approx((32 + 300) * 16 * 4 / 2**20, abs=1e-3)
        assert bd.note_value(r, "floor_mib") == pytest.approx(3 * (32 + 300) * 16 * 4 / 2**20, abs=0.01)
        if sys.platform.startswith("linux"):
            assert float(r["peak_extra_mib"]) >= 0
    assert "| gpuce |" in capsys.readouterr().out
    bd.main(argv)  # a second run replaces its rows
    assert len(B.read_rows(path)) == len(rows)


def test_bad_options_are_refused():
    import bench.bench_distill as bd

    for argv in (["--dry", "--betas", "1.5"], ["--dry", "--temperature", "0"]):
        with pytest.raises(SystemExit):
            bd.main(argv)


def test_plot_draws_a_column_a_beta(tmp_path):
    pytest.importorskip("matplotlib")
    import bench.bench_distill as bd

    rows = []
    for beta in (0, 0.5):
        for v, t in ((8192, 1.0), (32768, 4.0)):
            rows.append(dict(provider="gpuce", mode=bd.mode_name(beta), dtype="float32", N=256, C=v,
                             gpu_name="cpu:x", p50_ms=str(t), peak_extra_mib="3.0",
                             note=f"D=256; logits_mib={256 * v * 4 / 2**20}"))
    rows.append(dict(provider="liger", mode=bd.mode_name(0), dtype="float32", N=256, C=8192,
                     gpu_name="cpu:x", note="D=256; logits_mib=8; failed: ImportError"))
    assert bd.plot(rows, tmp_path / "d.png") == 2 and (tmp_path / "d.png").stat().st_size > 1000


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gpuce_agrees_with_float64(beta):
    mod = B.load_providers("distill")
    x = _inputs()
    want = _float64_reference(**x, beta=beta, tau=0.7)
    loss, grads = mod.providers(np, None, **x, beta=beta, temperature=0.7)["gpuce"]()
    for a, b, what in zip((loss, grads.X, grads.W), want, ("loss", "dXs", "dWs")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=what)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_every_torch_provider_agrees_with_float64(beta):
    """The loss and the student's dXs, dWs of each torch-side provider (the materialised
    reference, its compiled form, gpuce.torch and Liger where present) against float64."""
    torch = pytest.importorskip("torch")
    mod = B.load_providers("distill")
    x = _inputs()
    want = _float64_reference(**x, beta=beta, tau=0.7)
    got = mod.providers(np, torch, **x, beta=beta, temperature=0.7)
    got.pop("gemms"), got.pop("gpuce")
    assert {"torch", "torch-compile"} <= set(got)
    for name, fn in got.items():
        loss, gx, gw = fn()
        for a, b, what in zip((loss, gx, gw), want, ("loss", "dXs", "dWs")):
            np.testing.assert_allclose(a.detach().numpy(), b, rtol=1e-4, atol=1e-5 * np.abs(b).max(),
                                       err_msg=f"{name} {what}")


# ------------------------------------------------------------------ the dense-logits form

def _logits(n=24, v=300, seed=1):
    """Student logits S (n, v) and a correlated teacher's T (float32)."""
    rng = np.random.default_rng(seed)
    S = (2 * rng.standard_normal((n, v))).astype(np.float32)
    T = (S + 2 * rng.standard_normal((n, v))).astype(np.float32)
    return dict(S=S, T=T)


def _float64_logits_reference(S, T, beta, tau):
    """(loss, dS) in float64 from the definitions: the mean over the rows of KL(p_T ‖ p_S)
    (β = 0), KL(p_S ‖ p_T) (β = 1) or β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M), M = β p_T +
    (1 − β) p_S, p = softmax(logits / τ); the gradient is ∂L/∂p_S pushed through the softmax
    by hand (p_S ⊙ (a − ⟨p_S, a⟩)), divided by τ and N."""
    S, T = S.astype(np.float64) / tau, T.astype(np.float64) / tau
    ps = np.exp(S - S.max(1, keepdims=True))
    ps /= ps.sum(1, keepdims=True)
    pt = np.exp(T - T.max(1, keepdims=True))
    pt /= pt.sum(1, keepdims=True)
    ls, lt = np.log(ps), np.log(pt)
    if beta == 0:
        rows, a = (pt * (lt - ls)).sum(1), -pt / ps  # ∂KL(p_T ‖ p_S)/∂p_S
    elif beta == 1:
        rows, a = (ps * (ls - lt)).sum(1), ls - lt + 1
    else:
        m = beta * pt + (1 - beta) * ps
        lm = np.log(m)
        rows = beta * (pt * (lt - lm)).sum(1) + (1 - beta) * (ps * (ls - lm)).sum(1)
        # ∂/∂p_S: −β (1 − β) p_T / M from the first term, (1 − β)(log p_S − log M + 1 −
        # (1 − β) p_S / M) from the second
        a = (-beta * (1 - beta) * pt / m
             + (1 - beta) * (ls - lm + 1 - (1 - beta) * ps / m))
    dS = ps * (a - (ps * a).sum(1, keepdims=True)) / tau / len(S)
    return rows.mean(), dS


def test_logits_provider_file_has_the_interface():
    mod = B.load_providers("distill_logits")
    assert mod.OP == "distill_logits" and isinstance(mod.NAMES, tuple)
    assert {"gpuce", "gpuce-torch", "torch", "torch-compile", "liger-jsd", "liger-kldiv"} == set(mod.NAMES)
    assert set(mod.providers(types.SimpleNamespace(), None, **_logits())) == {"gpuce"}
    for beta in (0.0, 0.5, 1.0):
        got = mod.providers(np, None, **_logits(), beta=beta, temperature=0.7)
        assert set(got) == {"gpuce"} and all(callable(f) for f in got.values())
    loss, g = mod.providers(np, None, **_logits())["gpuce"]()
    assert np.ndim(loss) == 0 and g.shape == (24, 300) and g.dtype == np.float32


def test_logits_torch_providers_are_there_when_their_libraries_are():
    torch = pytest.importorskip("torch")
    mod = B.load_providers("distill_logits")
    got = set(mod.providers(np, torch, **_logits(), beta=0.5))
    assert {"gpuce", "gpuce-torch", "torch", "torch-compile"} <= got <= set(mod.NAMES)
    assert not {"liger-jsd", "liger-kldiv"} & got  # Liger is CUDA only: never on NumPy arrays


def test_logits_provider_file_imports_neither_cupy_nor_torch():
    code = ("import sys, gpuce.benchmark as B\n"
            "B.load_providers('distill_logits')\n"
            "print('cupy' in sys.modules, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_logits_dry_run_writes_the_csv(tmp_path, capsys):
    import bench.bench_distill as bd
    import bench.bench_distill_logits as bl

    path = tmp_path / "distill_logits_cpu.csv"
    names = ["gpuce"] + (["torch"] if _torch() is not None else [])
    argv = ["--dry", "--shape", "32", "300", "--repeat", "2", "--csv", str(path),
            "--temperature", "0.7", "--providers", *names]
    assert bl.main(argv) == 0
    rows = B.read_rows(path)
    with path.open() as f:
        assert tuple(csv.DictReader(f).fieldnames) == B.FIELDS
    modes = ("fwd+bwd:beta=0", "fwd+bwd:beta=0.5")
    assert ({(r["provider"], r["mode"]) for r in rows}
            == {(p, m) for p in names for m in modes} | {("copy", "copy")})
    for r in rows:
        assert r["op"] == "distill_logits" and r["dtype"] == "float32" and r["gpu_name"].startswith("cpu:")
        assert (int(r["N"]), int(r["C"])) == (32, 300)
        assert 0 < float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert float(r["gbps"]) > 0
        if r["provider"] == "copy":
            continue
        assert bd.note_value(r, "tau") == 0.7
        assert bd.note_value(r, "beta") == float(r["mode"].rpartition("=")[2])
        assert bd.note_value(r, "floor_mib") == pytest.approx(3 * 32 * 300 * 4 / 2**20, abs=0.01)
        assert float(r["gbps"]) == pytest.approx(3 * 32 * 300 * 4 / float(r["p50_ms"]) / 1e6, rel=1e-3)
        assert float(r["frac_of_floor"]) == pytest.approx(float(r["floor_ms"]) / float(r["p50_ms"]), rel=2e-3, abs=6e-4)
        if sys.platform.startswith("linux"):
            assert float(r["peak_extra_mib"]) >= 0
    assert "| gpuce |" in capsys.readouterr().out
    bl.main(argv)  # a second run replaces its rows
    assert len(B.read_rows(path)) == len(rows)


def test_logits_bad_options_are_refused():
    import bench.bench_distill_logits as bl

    for argv in (["--dry", "--betas", "-0.1"], ["--dry", "--temperature", "inf"]):
        with pytest.raises(SystemExit):
            bl.main(argv)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_every_logits_provider_agrees_with_float64(beta):
    """The loss and the student's gradient of each provider (gpuce's array form, and where
    torch imports gpuce.torch, the eager reference and its compiled form) against float64."""
    mod = B.load_providers("distill_logits")
    x = _logits()
    want_loss, want_g = _float64_logits_reference(**x, beta=beta, tau=0.7)
    torch = _torch()
    got = mod.providers(np, torch, **x, beta=beta, temperature=0.7)
    if torch is not None:
        assert {"gpuce-torch", "torch", "torch-compile"} <= set(got)
    for name, fn in got.items():
        loss, g = fn()
        if name != "gpuce":
            loss, g = loss.detach().numpy(), g.numpy()
        np.testing.assert_allclose(loss, want_loss, rtol=1e-4, err_msg=f"{name} loss")
        np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-5 * np.abs(want_g).max(),
                                   err_msg=f"{name} dS")
