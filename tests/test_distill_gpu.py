"""The fused distillation kernels on a GPU (gpuce._cuda.distill.distill_rows_fused) against the
array path (gpuce._distill_rows.dense_rows) on NumPy copies of the same inputs: every dtype,
forward and reverse KL, temperature, softcap, a scalar and a per-row σ, the gradient in place
over strided student rows, inactive and non-finite rows, rows whose two maxima lie too far
apart for the kernels' one shift (recomputed by the host), and the generalised JSD left to the
caller (NotImplementedError).  Skipped without a GPU."""

import zlib

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

DTYPES = ["float16", "bfloat16", "float32", "float64"]
ACC = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float32, "float64": np.float64}
# relative tolerances of the loss (accumulation dtype) and of the gradient (its own dtype)
TOL = {"float16": 1e-3, "bfloat16": 2.0**-8, "float32": 5e-5, "float64": 1e-10}


def _np_dtype(name):
    from gpuce._validation import bfloat16_dtype

    return bfloat16_dtype() if name == "bfloat16" else np.dtype(name)


def _args(dtype, n, c, beta, tau, cap):
    from gpuce._validation import DistillArgs

    return DistillArgs(lead_shape=(n,), n=n, c=c, acc=np.dtype(ACC[dtype]), beta=beta, temperature=tau,
                       softcap=cap, ignore_index=-100, reduction="none", return_grad=True, sparse=False)


def _inputs(dtype, n, c, seed, ld):
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    dt = _np_dtype(dtype)
    ss = (rng.standard_normal((n, ld)) * 3).astype(dt)
    ts = (ss.astype(np.float64) + rng.standard_normal((n, ld)) * 1.5).astype(dt)
    s, t = ss[:, :c], ts[:, :c]
    active = np.ones(n, bool)
    active[::7] = False
    s[0, :] = np.nan  # inactive, whatever it holds
    s[1, c // 2] = np.nan  # a NaN row
    t[2, :] = -np.inf  # the teacher all -inf: NaN (the host's rows)
    s[3, 0] = -np.inf  # an -inf student entry
    t[4, :] = s[4, :]  # student == teacher
    t[5, :] = (s[5, :].astype(np.float64) + 300.0).astype(dt)  # maxima far apart (the host's rows)
    s[6, :] = 1.0  # ties
    sig = rng.random(n) + 0.5
    return ss, ts, s, t, active, sig


def _compare(got, want, rtol, what):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    nan = np.isnan(want)
    assert np.isnan(got[nan]).all(), what
    fin = ~nan & np.isfinite(want)
    assert (got[~nan & ~fin] == want[~nan & ~fin]).all(), what
    scale = max(1.0, float(np.abs(want[fin]).max(initial=0.0)))
    np.testing.assert_allclose(got[fin], want[fin], rtol=rtol, atol=rtol * scale, err_msg=what)


def _run(dtype, c, beta, *, tau=1.0, cap=0.0, grad=True, inplace=False, ld=None, per_row=False, n=64):
    import cupy as cp

    from gpuce import _distill_rows
    from gpuce._cuda import distill

    ld = ld or c
    ss, ts, s, t, active, sig = _inputs(dtype, n, c, f"{dtype}-{c}-{beta}-{tau}-{cap}-{inplace}-{ld}", ld)
    acc = ACC[dtype]
    args = _args(dtype, n, c, beta, tau, cap)
    sigma = sig.astype(acc) if per_row else 0.75
    want_loss = np.full(n, -7.0, acc)
    want_grad = np.full((n, c), -7.0, s.dtype) if grad else None
    _distill_rows.dense_rows(np, s.copy(), t.copy(), args, active, want_loss, want_grad, sigma)

    ss_d, ts_d = cp.asarray(ss), cp.asarray(ts)
    s_d, t_d = ss_d[:, :c], ts_d[:, :c]
    loss = cp.full(n, -7.0, acc)
    g = None
    if grad:
        g = s_d if inplace else cp.full((n, c), -7.0, s_d.dtype)
    distill.distill_rows_fused(s_d, t_d, args, cp.asarray(active), loss, g,
                               cp.asarray(sigma) if per_row else sigma)
    cp.cuda.get_current_stream().synchronize()
    rtol = TOL["float32" if acc == np.float32 else "float64"]
    _compare(loss.get(), want_loss, rtol, "loss")
    if grad:
        _compare(g.get().astype(np.float64), want_grad.astype(np.float64), TOL[dtype], "gradient")
    if inplace and ld > c:  # the columns past C keep their logits
        np.testing.assert_array_equal(ss_d.get()[:, c:], ss[:, c:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("c", [7, 1000, 50257])
def test_forward_and_backward(dtype, beta, c):
    _run(dtype, c, beta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("c", [33, 4096, 131072])
def test_temperature_softcap_and_row_scale(dtype, beta, c):
    _run(dtype, c, beta, tau=0.7, cap=20.0, per_row=True)
    _run(dtype, c, beta, tau=1.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [100, 32000])
def test_loss_only(dtype, c):
    _run(dtype, c, 0.0, grad=False)
    _run(dtype, c, 1.0, grad=False, tau=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,ld", [(1001, 1003), (50257, 50260), (64, 64)])
def test_in_place_over_strided_rows(dtype, c, ld):
    _run(dtype, c, 0.0, inplace=True, ld=ld)
    _run(dtype, c, 1.0, inplace=True, ld=ld, tau=0.8, cap=10.0, per_row=True)


def test_jsd_and_mixed_dtypes_are_left_to_the_caller():
    import cupy as cp

    from gpuce._cuda import distill

    s = cp.zeros((4, 10), cp.float32)
    loss = cp.zeros(4, cp.float32)
    with pytest.raises(NotImplementedError):
        distill.distill_rows_fused(s, s, _args("float32", 4, 10, 0.5, 1.0, 0.0), cp.ones(4, bool), loss)
    with pytest.raises(NotImplementedError):
        distill.distill_rows_fused(s, s.astype(cp.float16), _args("float32", 4, 10, 0.0, 1.0, 0.0),
                                   cp.ones(4, bool), loss)


def test_zero_rows():
    import cupy as cp

    from gpuce._cuda import distill

    s = cp.zeros((0, 10), cp.float32)
    distill.distill_rows_fused(s, s, _args("float32", 0, 10, 0.0, 1.0, 0.0), cp.ones(0, bool),
                               cp.zeros(0, cp.float32))
