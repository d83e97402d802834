"""The fused token log-probability / entropy kernels (kernels/gpuce_tokens.cu: the policy of
kernels/gpuce_tokens_policy.cuh run through cross-entropy's unchanged bodies and merges) in the
SIMT emulator (tests/host/simt.h), against a float64 reference written here from the formulas.

Per row, with v = s tanh(f / s) (softcap s) or f, u = v / τ, m = max u, s = Σ exp(u - m),
b = Σ exp(u - m) (u - m):  log p = (u_k - m) - log s,  H = log s - b / s, and the gradient of
Σ g_l log p + g_H H:  (1/τ) (g_l ([j = k] - q_j) - g_H q_j (log q_j + H)) (1 - tanh²(f / s)).
Rows whose maximum is not finite give NaN; ignored rows give 0.

The launch shapes are the planner's kinds (warp teams, block teams, clusters, the two-pass
kernel) at the emulator's sizes; every kernel of gpuce_tokens.cu built here is an
instantiation of gpuce._cuda.tokens.variants().
"""

import ctypes
import zlib

import numpy as np
import pytest

from helpers import simt_library
from gpuce._cuda import fused as F
from gpuce._cuda import tokens as TK

ml_dtypes = pytest.importorskip("ml_dtypes")

DEV = F.Device(arch=90, sms=2, smem_optin=227 * 1024)
NP = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}
IGNORE = -100


def _plan(kind, dtype, index, grad, vec, c, threads, group=0, cluster=0):
    """A TokPlan at the emulator's size: the ring plan of cross-entropy's variant of the same
    kind (room for one more pack a row: rows here start anywhere in their 16-byte granules)."""
    v = TK.TokVariant(kind, dtype, index, grad, vec, group, cluster)
    ce = F.Variant(kind, dtype, "label", index, vec, group, cluster)
    if kind == "twopass":
        return TK.TokPlan(v, F.Plan(ce, threads))
    shape = F._team_plan(ce, c + vec - 1, threads, DEV)
    assert shape is not None, (v, c, threads)
    return TK.TokPlan(v, shape)


# (plan, C, grid): every kind, every dtype, both label dtypes, gradients of the logits' dtype
# and float32 gradients of 16-bit logits, 16-byte packs and a value a pack, rows of a few
# values, of C not a multiple of the pack, and of hundreds to thousands
CASES = [
    (_plan("warp", "float32", "int64", "float32", 4, 5, 64, group=4), 5, 2),
    (_plan("warp", "float32", "int32", "float32", 4, 37, 64, group=8), 37, 2),
    (_plan("warp", "bfloat16", "int64", "bfloat16", 8, 300, 64, group=32), 300, 2),
    (_plan("warp", "float16", "int32", "float32", 8, 77, 64, group=16), 77, 1),
    (_plan("warp", "float64", "int64", "float64", 2, 37, 64, group=8), 37, 1),
    (_plan("block", "float32", "int64", "float32", 4, 333, 64), 333, 3),
    (_plan("block", "float32", "int32", "float32", 1, 29, 32), 29, 2),
    (_plan("block", "bfloat16", "int32", "float32", 8, 1001, 64), 1001, 2),
    (_plan("block", "float64", "int32", "float64", 1, 100, 64), 100, 2),
    (_plan("block", "float16", "int64", "float16", 8, 500, 64), 500, 2),
    (_plan("cluster", "float32", "int64", "float32", 4, 1000, 64, cluster=2), 1000, 4),
    (_plan("cluster", "bfloat16", "int32", "float32", 8, 2000, 32, cluster=4), 2000, 4),
    (_plan("twopass", "float32", "int64", "float32", 4, 1001, 64), 1001, 3),
    (_plan("twopass", "float64", "int64", "float64", 1, 999, 64), 999, 2),
    (_plan("twopass", "bfloat16", "int32", "float32", 8, 304, 64), 304, 2),
    (_plan("twopass", "float16", "int64", "float16", 8, 37, 32), 37, 2),
]


def _case_id(case):
    p, c, _ = case
    v = p.variant
    return f"{v.describe()}-{v.dtype}-{v.index}-grad_{v.grad}-C{c}"


def _wrapper(i, p):
    v = p.variant
    t, a, lab = F.CT[v.dtype], F.CT[F.ACC[v.dtype]], F.CT[v.index]
    ring = ", P, S" if v.kind in ("warp", "block", "cluster") else ""
    return f'''
extern "C" void run_{i}(unsigned cluster, unsigned grid, unsigned block, size_t shm, const void* x, long long ldx,
                        const void* labels, long long n, int c, double cap, double inv_tau, long long ign,
                        void* logp, void* ent, void* grad, long long ldg, const void* gl, const void* gh,
                        long long* ws, int P, int S) {{
    simt_launch(grid, block, shm, [=] {{
        {v.expr()}((const {t}*)x, ldx, (const {lab}*)labels, n, c, ({a})cap, ({a})inv_tau, ign, ({a}*)logp,
                   ({a}*)ent, ({t}*)grad, ldg, (const {a}*)gl, (const {a}*)gh, ws{ring});
    }}, cluster);
}}'''


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """gpuce_tokens.cu (its headers pasted) built for the emulator: simt_library builds the
    fused program's text, pointed here at the token kernels' file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "SOURCE", TK.SOURCE)
        return simt_library(tmp_path_factory.mktemp("tokens"),
                            "".join(_wrapper(i, p) for i, (p, _, _) in enumerate(CASES)))


def _inputs(rng, dtype, n, c, big, ldx):
    """Logits (a view of (n, ldx) storage: rows start anywhere in their 16-byte granules) with
    adversarial rows, and labels (every fifth row ignored)."""
    dt = NP[dtype]
    store = (rng.standard_normal((n, ldx)) * 3).astype(dt)
    x = store[:, :c]
    lab = rng.integers(0, c, n)
    lab[::5] = IGNORE
    x[1, : min(c, 3)] = np.array([big, big - 1, -big])[: min(c, 3)].astype(dt)  # huge values
    lab[1] = min(1, c - 1)
    x[2, 0] = -np.inf  # an entry at -inf, and the label on it: log p = -inf
    lab[2] = 0
    x[3, c // 2] = np.nan  # a NaN row
    x[4, c - 1] = np.inf  # a +inf row (softcap: a finite one)
    x[6, :] = -np.inf  # every entry -inf (softcap: ties)
    x[7, :] = 7.0  # ties everywhere: H = log C
    x[8, :] = -40.0
    x[8, c // 3] = 40.0  # nearly one-hot: H ~ 0
    lab[8] = c // 3
    x[9, ::3] = -np.inf  # several -inf entries
    lab[9] = 1 % c
    x[10, :] = np.nan  # an ignored row whatever it holds
    return store, x, lab


def _reference(x, lab, tau, cap, gl, gh):
    """Float64 log p, H and the gradient of Σ gl log p + gh H, from the formulas."""
    f = x.astype(np.float64)
    n, c = f.shape
    with np.errstate(all="ignore"):
        v = cap * np.tanh(f / cap) if cap else f
        u = v / tau
        m = u.max(axis=1)
        bad = ~np.isfinite(m)
        ms = np.where(bad, 0.0, m)
        d = u - ms[:, None]
        e = np.exp(d)
        s = e.sum(axis=1)
        b = np.where(e > 0, e * d, 0.0).sum(axis=1)
        active = lab != IGNORE
        k = np.where(active, lab, 0)
        logs = np.log(s)
        logp = d[np.arange(n), k] - logs
        ent = logs - b / s
        q = e / s[:, None]
        logq = d - logs[:, None]
        qlogq_h = np.where(q > 0, q * (logq + ent[:, None]), 0.0)
        onehot = np.zeros((n, c))
        onehot[np.arange(n), k] = 1.0
        grad = (gl[:, None] * (onehot - q) - gh[:, None] * qlogq_h) / tau
        if cap:
            grad = grad * (1.0 - np.tanh(f / cap) ** 2)
    logp[bad] = np.nan
    ent[bad] = np.nan
    grad[bad] = np.nan
    logp[~active] = 0.0
    ent[~active] = 0.0
    grad[~active] = 0.0
    return logp, ent, grad


# (log p, H) and gradient tolerances (relative; absolute scaled by the gradient's size)
RTOL = {"float16": 1e-3, "bfloat16": 2.0**-8, "float32": 2e-5, "float64": 1e-10}

# name: (tau, softcap, entropy out, gradient, g_logp, g_entropy)
OPTIONS = {
    "logp-only": (1.0, 0.0, False, False, False, False),  # the lean sums (two-pass: lean online)
    "plain-grad": (1.0, 0.0, True, True, True, False),  # the lean path with the entropy sum
    "entropy-grad": (1.0, 0.0, True, True, True, True),
    "entropy-grad-only": (1.0, 0.0, False, True, False, True),  # g_logp a null pointer
    "temperature": (0.7, 0.0, True, True, True, True),  # the online update
    "softcap-temperature": (1.6, 5.0, True, True, True, True),
    "softcap-logp": (1.0, 3.0, False, True, True, False),
}


def _run(lib, case, option, *, inplace=False, n=23, grid=None):
    p, c, g0 = CASES[case]
    v = p.variant
    tau, cap, want_ent, want_grad, has_gl, has_gh = OPTIONS[option]
    rng = np.random.default_rng(zlib.crc32(f"{case}-{option}-{inplace}-{n}".encode()))
    exact = tau == 1.0 and not cap and v.dtype in ("float32", "float64")
    big = 1e4 if exact else 60.0
    ldx = c + int(rng.integers(0, 5))
    store, x, lab = _inputs(rng, v.dtype, n, c, big, ldx)
    x0 = x.copy()
    store0 = store.copy()
    acc = np.dtype(F.ACC[v.dtype])
    labels = lab.astype(np.int32 if v.index == "int32" else np.int64)
    gl = (rng.standard_normal(n) + 1.0).astype(acc) if has_gl else None
    gh = (rng.standard_normal(n) * 0.5 - 0.3).astype(acc) if has_gh else None
    logp = np.full(n, -7.0, acc)  # poisoned: every row must be written
    ent = np.full(n, -7.0, acc) if want_ent else None
    gstore = None
    if want_grad and inplace:
        assert v.grad == v.dtype
        gstore, ldg = store, ldx
    elif want_grad and v.grad == v.dtype:
        gstore, ldg = np.full((n, ldx), -7.0, x.dtype), ldx  # the logits' offsets in their granules
    elif want_grad:
        gstore = np.full((n, c + 1), -7.0, np.dtype(v.grad))
        ldg = gstore.strides[0] // x.itemsize  # a D row behind a T pointer: the stride in T units
    ws = np.zeros(F.WS_PARTIALS + F.WS_WORDS * 64, np.int64)
    ptr = lambda a: ctypes.c_void_p(None if a is None else a.ctypes.data)  # noqa: E731
    fn = getattr(lib, f"run_{case}")
    fn.restype = None
    fn(ctypes.c_uint(max(1, v.cluster)), ctypes.c_uint(grid or g0), ctypes.c_uint(p.threads),
       ctypes.c_size_t(p.smem), ptr(store), ctypes.c_longlong(ldx), ptr(labels), ctypes.c_longlong(n),
       ctypes.c_int(c), ctypes.c_double(cap), ctypes.c_double(1.0 / tau), ctypes.c_longlong(IGNORE), ptr(logp),
       ptr(ent), ptr(gstore), ctypes.c_longlong(ldg if want_grad else 0), ptr(gl), ptr(gh),
       ctypes.cast(ws.ctypes.data, ctypes.POINTER(ctypes.c_longlong)), ctypes.c_int(p.shape.packs),
       ctypes.c_int(p.shape.stages))
    assert ws[0] == 0  # the ticket is reset for the next launch
    zeros = np.zeros(n, acc)
    want = _reference(x0, lab, tau, cap, zeros if gl is None else gl.astype(np.float64),
                      zeros if gh is None else gh.astype(np.float64))
    grad = None if gstore is None else gstore[:, :c]
    return x0, lab, logp, ent, grad, (gstore, store0), want


def _check(v, lab, logp, ent, grad, want):
    want_logp, want_ent, want_grad = want
    rtol = RTOL[F.ACC[v.dtype]] if v.dtype in ("float16", "bfloat16") else RTOL[v.dtype]
    np.testing.assert_allclose(logp, want_logp, rtol=rtol, atol=rtol)
    if ent is not None:
        np.testing.assert_allclose(ent, want_ent, rtol=rtol, atol=rtol)
    bad = np.isnan(want_logp)
    if grad is not None:
        g = grad.astype(np.float64)
        gt = RTOL[v.grad]
        scale = np.nanmax(np.abs(want_grad[~bad]), initial=1.0)
        np.testing.assert_allclose(g[~bad], want_grad[~bad], rtol=gt, atol=gt * scale)
        assert np.isnan(g[bad]).all()
        assert (g[lab == IGNORE] == 0).all()


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("case", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_token_kernel_on_host(lib, case, option):
    """log p, H and the gradient of a launch against the float64 reference."""
    p = CASES[case][0]
    x0, lab, logp, ent, grad, _, want = _run(lib, case, option)
    _check(p.variant, lab, logp, ent, grad, want)
    assert np.isnan(logp[3]) and logp[10] == 0.0  # a NaN row; an ignored row of NaNs
    if not OPTIONS[option][1]:  # no softcap: the +inf row and the all -inf row are NaN rows
        assert np.isnan(logp[[4, 6]]).all()
        assert logp[2] == -np.inf  # the label on an -inf entry


@pytest.mark.parametrize("option", ["plain-grad", "softcap-temperature"])
@pytest.mark.parametrize("case", [i for i, (p, _, _) in enumerate(CASES) if p.variant.grad == p.variant.dtype],
                         ids=[_case_id(c) for c in CASES if c[0].variant.grad == c[0].variant.dtype])
def test_gradient_in_place(lib, case, option):
    """The gradient written over the logits (rows strided in one storage): the same results,
    and the storage's columns past C untouched."""
    p = CASES[case][0]
    x0, lab, logp, ent, grad, store, want = _run(lib, case, option, inplace=True)
    _check(p.variant, lab, logp, ent, grad, want)
    c = CASES[case][1]
    after, before = store
    np.testing.assert_array_equal(after[:, c:], before[:, c:])  # the columns past C keep their logits


@pytest.mark.parametrize("case", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_one_team_walks_many_rows(lib, case):
    """One block (one cluster) for 150 rows: every team walks its ring many times, reusing its
    slots, parity buffers and cluster tags row after row."""
    p = CASES[case][0]
    x0, lab, logp, ent, grad, _, want = _run(lib, case, "entropy-grad", n=150, grid=max(1, p.variant.cluster))
    _check(p.variant, lab, logp, ent, grad, want)


def test_every_case_is_an_instantiation():
    """The emulated kernels are in the compile list, and each ring holds a row."""
    compiled = set(TK.variants())
    for p, c, _ in CASES:
        assert p.variant in compiled
        if p.variant.kind != "twopass":
            nt = p.variant.group or p.threads * max(1, p.variant.cluster)
            assert p.shape.packs * nt * p.variant.vec >= c + p.variant.vec - 1


def test_planner_keeps_only_instantiations():
    """Every plan the token planner offers is compiled; rows of every length have one (the
    two-pass kernel last), and no plan is a tile or a register stage."""
    for dtype in F.DTYPES:
        for grad in {dtype, F.ACC[dtype]}:
            for c in (1, 5, 37, 300, 4096, 50257, 262144):
                for vec in {1, F.VEC_MAX[dtype]} if grad == dtype else {F.VEC_MAX[dtype]}:
                    plans = TK.candidates(dtype, "int64", grad, c, vec, DEV, c % vec != 0)
                    assert plans and plans[-1].variant.kind == "twopass"
                    assert all(p.variant in set(TK.variants()) for p in plans)
