"""Which rows token_logprobs and distillation_loss run on CuPy arrays: the routing decision
(gpuce._rows.token_route / distill_route, pure functions of dtype names, shapes, strides and
flags) on the CPU, that the kernels' host code refuses what the routing leaves to the array
rows, that run_token_rows / run_distill_rows call what the routing says (the kernels replaced
by recorders, so no GPU is needed), and, with a GPU, that the public calls launch the fused
kernels under gpuce.use_impl("fused") and agree with NumPy."""

from types import SimpleNamespace

import numpy as np
import pytest

import gpuce
from gpuce import _rows
from gpuce._rows import distill_route, layout, token_route
from gpuce._validation import DistillArgs, TokenArgs

ITEM = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
ACC = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}


def lay(dtype, n, c, ld=None, col=None):
    """(dtype name, shape, strides) of (n, c) rows ``ld`` elements apart (c by default)."""
    isz = ITEM.get(dtype, 16)
    return (dtype, (n, c), ((c if ld is None else ld) * isz, isz if col is None else col))


# ------------------------------------------------------------------------------ token_route

@pytest.mark.parametrize("dtype", list(ITEM))
def test_token_route_takes_every_kernel_dtype(dtype):
    r = token_route("fused", ACC[dtype], -100, lay(dtype, 8, 100))
    assert r.path == "fused", r.reason
    assert token_route("fused", ACC[dtype], -100, lay(dtype, 8, 100), lay(dtype, 8, 100)).path == "fused"
    # the gradient in the accumulation dtype (the linear form's chunks, in place)
    assert token_route("fused", ACC[dtype], -100, lay(dtype, 8, 100), lay(ACC[dtype], 8, 100)).path == "fused"
    # padded rows (a row stride past C) are read where they lie
    assert token_route("fused", ACC[dtype], -100, lay(dtype, 8, 100, ld=104)).path == "fused"


def test_token_route_portable_is_the_array_rows():
    r = token_route("portable", "float32", -100, lay("float32", 8, 100))
    assert r.path == "array" and "portable" in r.reason


@pytest.mark.parametrize("case,why", [
    (dict(logits=lay("float128", 8, 100), acc="float128"), "float128 logits"),
    (dict(logits=lay("float16", 8, 100), acc="float64"), "accumulating in float64"),
    (dict(logits=lay("float32", 2**31, 10)), "rows"),
    (dict(logits=lay("float32", 8, 2**31)), "classes"),
    (dict(ignore_index=2**63), "int64 range"),
    (dict(ignore_index=-(2**63) - 1), "int64 range"),
    (dict(ignore_index=2**32 + 3), "lower 32 bits"),
    (dict(logits=lay("float32", 8, 100, col=8)), "column stride"),
    (dict(logits=("float32", (8, 100), (-400, 4))), "row stride"),
    (dict(logits=("float32", (8, 100), (402, 4))), "row stride"),
    (dict(grad=lay("float64", 8, 100)), "gradient output of float64"),
    (dict(grad=lay("float16", 8, 100)), "gradient output of float16"),
    (dict(grad=lay("float32", 8, 99)), "gradient output"),
    (dict(grad=lay("float32", 8, 100, col=8)), "gradient output has a column stride"),
])
def test_token_route_leaves_the_rest_to_the_array_rows(case, why):
    kw = dict(impl="fused", acc="float32", ignore_index=-100, logits=lay("float32", 8, 100), grad=None)
    kw.update(case)
    r = token_route(**kw)
    assert r.path == "array" and why in r.reason, r


def test_token_route_edges_the_kernels_take():
    # an ignore_index past int32 whose lower 32 bits name no class; one class at any stride
    assert token_route("fused", "float32", 2**32 + 3, lay("float32", 8, 3)).path == "fused"
    assert token_route("fused", "float32", -100, lay("float32", 8, 1, col=40)).path == "fused"
    assert token_route("fused", "float32", -100, ("float32", (1, 100), (12, 4))).path == "fused"
    assert token_route("fused", "float32", -100, lay("float32", 0, 100)).path == "fused"


def _stub(dtype, shape, strides):
    return SimpleNamespace(dtype=np.dtype(dtype) if dtype != "bfloat16" else SimpleNamespace(name=dtype),
                           shape=shape, strides=strides, itemsize=ITEM.get(dtype, 16))


@pytest.mark.parametrize("logits,acc,ii,grad", [
    (lay("float16", 8, 100), "float64", -100, None),
    (lay("float32", 2**31, 10), "float32", -100, None),
    (lay("float32", 8, 2**31), "float32", -100, None),
    (lay("float32", 8, 100), "float32", 2**32 + 3, None),
    (lay("float32", 8, 100, col=8), "float32", -100, None),
    (lay("float32", 8, 100), "float32", -100, lay("float64", 8, 100)),
    (lay("float32", 8, 100), "float32", -100, lay("float32", 8, 99)),
    (lay("float32", 8, 100), "float32", -100, lay("float32", 8, 100, col=8)),
])
def test_token_kernel_host_refuses_what_the_route_leaves(logits, acc, ii, grad):
    """Each of the kernels' own limits the route reads: the host code raises for it."""
    pytest.importorskip("cupy")
    from gpuce._cuda import tokens

    assert token_route("fused", acc, ii, logits, grad).path == "array"
    with pytest.raises((TypeError, ValueError)):
        tokens.token_rows(_stub(*logits), None, acc=np.dtype(acc), inv_temperature=1.0, softcap=None,
                          ignore_index=ii, logp_out=None, entropy_out=None,
                          grad_out=None if grad is None else _stub(*grad))


# ---------------------------------------------------------------------------- distill_route

@pytest.mark.parametrize("dtype", list(ITEM))
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_distill_route_takes_forward_and_reverse_kl(dtype, beta):
    s = lay(dtype, 8, 100)
    r = distill_route("fused", beta, False, ACC[dtype], s, lay(dtype, 8, 100, ld=128), s)
    assert r.path == "fused", r.reason
    assert ("forward" if beta == 0 else "reverse") in r.reason


@pytest.mark.parametrize("case,why", [
    (dict(impl="portable"), "portable"),
    (dict(beta=0.5), "beta=0.5"),
    (dict(beta=0.01), "JSD"),
    (dict(sparse=True), "sparse"),
    (dict(student=lay("float128", 8, 100), teacher=lay("float128", 8, 100)), "float128 student"),
    (dict(teacher=lay("float64", 8, 100)), "teacher float64"),
    (dict(teacher=lay("float32", 8, 99)), "one shape"),
    (dict(acc="float64"), "accumulating in float64"),
    (dict(student=lay("float32", 8, 2**31), teacher=lay("float32", 8, 2**31)), "classes"),
    (dict(student=lay("float32", 8, 100, col=8)), "the student has a column stride"),
    (dict(teacher=lay("float32", 8, 100, col=8)), "the teacher has a column stride"),
    (dict(teacher=("float32", (8, 100), (-400, 4))), "the teacher has a row stride"),
    (dict(grad=lay("float16", 8, 100)), "gradient output of float16"),
    (dict(grad=lay("float32", 8, 100, col=8)), "the gradient output has a column stride"),
])
def test_distill_route_leaves_the_rest_to_the_array_rows(case, why):
    kw = dict(impl="fused", beta=0.0, sparse=False, acc="float32", student=lay("float32", 8, 100),
              teacher=lay("float32", 8, 100), grad=None)
    kw.update(case)
    r = distill_route(**kw)
    assert r.path == "array" and why in r.reason, r


def _dargs(dtype, n, c, beta=0.0, sparse=False, acc=None):
    return DistillArgs(lead_shape=(n,), n=n, c=c, acc=np.dtype(acc or ACC[dtype]), beta=beta,
                       temperature=1.0, softcap=0.0, ignore_index=-100, reduction="none",
                       return_grad=True, sparse=sparse)


@pytest.mark.parametrize("beta,sparse,acc,s,t,g", [
    (0.5, False, "float32", lay("float32", 8, 100), lay("float32", 8, 100), None),
    (0.0, True, "float32", lay("float32", 8, 100), lay("float32", 8, 100), None),
    (0.0, False, "float32", lay("float32", 8, 100), lay("float64", 8, 100), None),
    (1.0, False, "float64", lay("float32", 8, 100), lay("float32", 8, 100), None),
    (0.0, False, "float32", lay("float32", 8, 100), lay("float32", 8, 100), lay("float16", 8, 100)),
    (0.0, False, "float32", lay("float32", 8, 2**31), lay("float32", 8, 2**31), None),
    (0.0, False, "float32", lay("float32", 8, 100, col=8), lay("float32", 8, 100), None),
    (1.0, False, "float32", lay("float32", 8, 100), lay("float32", 8, 100, col=8), None),
])
def test_distill_kernel_host_refuses_what_the_route_leaves(beta, sparse, acc, s, t, g):
    """Each of the kernels' own limits the route reads: distill_rows_fused raises
    NotImplementedError for it, before it touches the device."""
    pytest.importorskip("cupy")
    from gpuce._cuda import distill

    assert distill_route("fused", beta, sparse, acc, s, t, g).path == "array"
    args = _dargs(s[0] if s[0] in ITEM else "float32", s[1][0], s[1][1], beta, sparse, acc)
    with pytest.raises(NotImplementedError):
        distill.distill_rows_fused(_stub(*s), _stub(*t), args, None, None,
                                   None if g is None else _stub(*g))


# ------------------------------------------------- the run_* functions call what the route says

class _FakeXp:
    """Stands in for cupy (anything but numpy): the routing reads only the arrays' layout."""


@pytest.fixture
def recorders(monkeypatch):
    from gpuce import _distill_rows, _impl, _tokens_rows
    from gpuce._cuda import distill, tokens

    monkeypatch.setattr(_impl, "fused_runs_here", lambda: True)  # a device of sm_80 or later
    calls = []
    monkeypatch.setattr(tokens, "token_rows", lambda *a, **k: calls.append(("fused-tokens", a, k)))
    monkeypatch.setattr(_tokens_rows, "token_rows", lambda *a, **k: calls.append(("array-tokens", a, k)))
    monkeypatch.setattr(distill, "distill_rows_fused", lambda *a, **k: calls.append(("fused-distill", a, k)))
    monkeypatch.setattr(_distill_rows, "dense_rows", lambda *a, **k: calls.append(("array-distill", a, k)))
    return calls


def _targs(n, c, ignore_index=-100):
    return TokenArgs(lead_shape=(n,), n=n, c=c, acc=np.dtype(np.float32), temperature=2.0,
                     softcap=5.0, ignore_index=ignore_index, return_entropy=True, return_grad=True)


def test_run_token_rows_follows_the_route(recorders):
    x = np.zeros((6, 10), np.float32)
    lab = np.zeros(6, np.int64)
    logp, ent, grad = np.empty(6, np.float32), np.empty(6, np.float32), np.empty_like(x)
    gl = np.ones(6, np.float32)
    _rows.run_token_rows(_FakeXp, x, lab, _targs(6, 10), logp, ent, grad, gl, None)
    kind, a, k = recorders.pop()
    assert kind == "fused-tokens" and a[0] is x and a[1] is lab
    assert k == dict(acc=np.dtype(np.float32), inv_temperature=0.5, softcap=5.0, ignore_index=-100,
                     logp_out=logp, entropy_out=ent, grad_out=grad, g_logp=gl, g_entropy=None)
    with gpuce.use_impl("portable"):
        _rows.run_token_rows(_FakeXp, x, lab, _targs(6, 10), logp, ent, grad, gl, None)
    assert recorders.pop()[0] == "array-tokens"
    # a layout the kernels cannot take, an ignore_index they cannot tell from a class
    _rows.run_token_rows(_FakeXp, x[:, ::2], lab, _targs(6, 5), logp, ent, None)
    _rows.run_token_rows(_FakeXp, x, lab, _targs(6, 10, 2**32 + 3), logp, ent, None)
    assert [c[0] for c in recorders] == ["array-tokens", "array-tokens"]
    recorders.clear()
    _rows.run_token_rows(np, x, lab, _targs(6, 10), logp, ent, grad)  # NumPy: always the array rows
    assert recorders.pop()[0] == "array-tokens"


def test_below_compute_capability_8_the_array_rows_run(recorders, monkeypatch):
    """A device that cannot run the fused kernels (below sm_80): the token and distillation
    rows take the array rows whatever impl says."""
    from gpuce import _impl

    monkeypatch.setattr(_impl, "fused_runs_here", lambda: False)
    x = np.zeros((6, 10), np.float32)
    lab = np.zeros(6, np.int64)
    logp, ent = np.empty(6, np.float32), np.empty(6, np.float32)
    S, T = np.zeros((6, 10), np.float32), np.ones((6, 10), np.float32)
    with gpuce.use_impl("fused"):
        _rows.run_token_rows(_FakeXp, x, lab, _targs(6, 10), logp, ent, None)
        _rows.run_distill_rows(_FakeXp, S, T, _dargs("float32", 6, 10, 0.0), np.ones(6, bool), logp)
    assert [c[0] for c in recorders] == ["array-tokens", "array-distill"]


def test_run_distill_rows_follows_the_route(recorders, monkeypatch):
    S, T = np.zeros((6, 10), np.float32), np.ones((6, 10), np.float32)
    act, loss = np.ones(6, bool), np.empty(6, np.float32)
    for beta in (0.0, 1.0):
        _rows.run_distill_rows(_FakeXp, S, T, _dargs("float32", 6, 10, beta), act, loss, S, 0.5)
        kind, a, k = recorders.pop()
        assert kind == "fused-distill" and not k and len(a) == 7 and a[2].beta == beta
        assert [id(v) for v in a[:2] + a[3:6]] == [id(v) for v in (S, T, act, loss, S)] and a[6] == 0.5
    _rows.run_distill_rows(_FakeXp, S, T, _dargs("float32", 6, 10, 0.5), act, loss, None, 1.0)
    kind, a, _ = recorders.pop()
    assert kind == "array-distill" and a[0] is _FakeXp and a[1] is S
    _rows.run_distill_rows(_FakeXp, S, T.astype(np.float64), _dargs("float32", 6, 10), act, loss)
    assert recorders.pop()[0] == "array-distill"
    with gpuce.use_impl("portable"):
        _rows.run_distill_rows(_FakeXp, S, T, _dargs("float32", 6, 10), act, loss)
    assert recorders.pop()[0] == "array-distill"
    _rows.run_distill_rows(np, S, T, _dargs("float32", 6, 10), act, loss)
    assert recorders.pop()[0] == "array-distill"
    assert not recorders

    from gpuce._cuda import distill

    def refuse(*a, **k):
        recorders.append(("refused", a, k))
        raise NotImplementedError("refused")

    monkeypatch.setattr(distill, "distill_rows_fused", refuse)
    _rows.run_distill_rows(_FakeXp, S, T, _dargs("float32", 6, 10), act, loss, None, 1.0)
    assert [c[0] for c in recorders] == ["refused", "array-distill"]


def test_layout():
    x = np.zeros((4, 6), np.float32)[:, 1:]
    assert layout(x) == ("float32", (4, 5), (24, 4)) and layout(None) is None


# ------------------------------------------------------------------------------- with a GPU

@pytest.fixture
def spies(monkeypatch):
    """Count the fused launches while running the real kernels."""
    from gpuce._cuda import distill, tokens

    counts = {"tokens": 0, "distill": 0}
    real_t, real_d = tokens.token_rows, distill.distill_rows_fused

    def t(*a, **k):
        counts["tokens"] += 1
        return real_t(*a, **k)

    def d(*a, **k):
        counts["distill"] += 1
        return real_d(*a, **k)

    monkeypatch.setattr(tokens, "token_rows", t)
    monkeypatch.setattr(distill, "distill_rows_fused", d)
    return counts


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "portable"])
def test_token_calls_launch_the_fused_kernels_on_cupy(spies, impl):
    import cupy as cp

    rng = np.random.default_rng(7)
    f = rng.normal(size=(33, 500)).astype(np.float32) * 3
    k = rng.integers(0, 500, 33)
    k[::5] = -100
    gl = rng.normal(size=33).astype(np.float32)
    want = gpuce.token_logprobs(f, k, return_entropy=True, return_grad=True, grad_logprobs=gl,
                                temperature=0.8, softcap=20.0)
    with gpuce.use_impl(impl):
        got = gpuce.token_logprobs(cp.asarray(f), cp.asarray(k), return_entropy=True,
                                   return_grad=True, grad_logprobs=cp.asarray(gl),
                                   temperature=0.8, softcap=20.0)
        X, W = rng.normal(size=(40, 16)).astype(np.float32), rng.normal(size=(500, 16)).astype(np.float32)
        y = rng.integers(0, 500, 40)
        lin = gpuce.linear_token_logprobs(cp.asarray(X), cp.asarray(W), cp.asarray(y), chunk_size=16,
                                          return_grad=True, grad_logprobs=cp.ones(40, cp.float32))
    # the (N, C) call: one launch; the linear form: one a chunk
    assert spies["tokens"] >= 3 if impl == "fused" else spies["tokens"] == 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(cp.asnumpy(g), w, rtol=5e-5, atol=5e-5)
    ref = gpuce.linear_token_logprobs(X, W, y, chunk_size=16, return_grad=True,
                                      grad_logprobs=np.ones(40, np.float32))
    np.testing.assert_allclose(cp.asnumpy(lin[0]), ref[0], rtol=5e-5, atol=5e-5)
    np.testing.assert_allclose(cp.asnumpy(lin[1].W), ref[1].W, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("beta,fused", [(0.0, True), (1.0, True), (0.5, False)])
def test_distillation_calls_launch_the_fused_kernels_on_cupy(spies, beta, fused):
    import cupy as cp

    rng = np.random.default_rng(11)
    S = rng.normal(size=(30, 300)).astype(np.float32) * 2
    T = S + rng.normal(size=(30, 300)).astype(np.float32)
    y = rng.integers(0, 300, 30)
    y[::4] = -100
    want = gpuce.distillation_loss(S, T, y, beta=beta, temperature=1.5, return_grad=True)
    with gpuce.use_impl("fused"):
        got = gpuce.distillation_loss(cp.asarray(S), cp.asarray(T), cp.asarray(y), beta=beta,
                                      temperature=1.5, return_grad=True)
        assert spies["distill"] == int(fused)
        # a float32 student with a float64 teacher: the array rows
        gpuce.distillation_loss(cp.asarray(S), cp.asarray(T, dtype=cp.float64), beta=beta)
        assert spies["distill"] == int(fused)
    with gpuce.use_impl("portable"):
        gpuce.distillation_loss(cp.asarray(S), cp.asarray(T), beta=beta)
    assert spies["distill"] == int(fused)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=5e-5)
    np.testing.assert_allclose(cp.asnumpy(got[1]), want[1], rtol=5e-5, atol=5e-7)


# ------------------------------------------------------------ dask: the choice at graph build

def test_dask_blocks_run_with_the_impl_in_force_when_the_graph_was_built(monkeypatch):
    """The dask forms apply gpuce.use_impl's choice, read when the graph is built, to their
    block tasks (run here on threads, where the context variable is not inherited)."""
    da = pytest.importorskip("dask.array")
    import gpuce.distillation as D
    import gpuce.tokens as K
    from gpuce._impl import auto_impl

    seen = []

    def spy(real):
        def run(*a, **k):
            seen.append(auto_impl())
            return real(*a, **k)
        return run

    monkeypatch.setattr(K, "run_token_rows", spy(K.run_token_rows))
    monkeypatch.setattr(D, "run_distill_rows", spy(D.run_distill_rows))
    rng = np.random.default_rng(3)
    f = da.from_array(rng.normal(size=(12, 9)), chunks=(4, 9))
    y = da.from_array(rng.integers(0, 9, 12), chunks=4)
    X = da.from_array(rng.normal(size=(12, 5)), chunks=(4, 5))
    W = rng.normal(size=(9, 5))
    with gpuce.use_impl("portable"):
        lazy = [gpuce.token_logprobs(f, y), gpuce.linear_token_logprobs(X, W, y),
                gpuce.distillation_loss(f, f * 0.5, y, beta=1.0),
                gpuce.linear_distillation_loss(X, W, X, W * 0.5, y)]
    assert auto_impl() == "fused"
    import dask

    dask.compute(*lazy, scheduler="threads")
    assert len(seen) >= 12 and set(seen) == {"portable"}, seen
