"""The fused distillation kernels (kernels/gpuce_distill.cu: the policy of
kernels/gpuce_distill_policy.cuh run through cross-entropy's unchanged bodies and merges) in the
SIMT emulator (tests/host/simt.h), against a float64 reference written here from the formulas.

Per row, with u = cap(S) / τ, w = cap(T) / τ (cap(f) = s tanh(f / s) with a softcap), log p_S =
u − lse(u), log p_T = w − lse(w):
  β = 0:  L = Σ p_T (log p_T − log p_S)  (terms with p_T = 0 are 0),  ∂L/∂u = p_S − p_T
  β = 1:  L = Σ p_S (log p_S − log p_T)  (terms with p_S = 0 are 0),  ∂L/∂u = p_S (log p_S − log p_T − L)
and the gradient written is σ_i (1/τ) ∂L/∂u (1 − tanh²(S / s) with a softcap).  Inactive rows
give 0 and a zero gradient row; a row whose student or teacher maximum is not finite gives NaN.
The kernels keep both streams' sums at one shift (the larger maximum): a row whose streams'
maxima lie too far apart (or one stream all -inf) is left to the host, flagged, its loss NaN and
its gradient row untouched; the flags are checked here against the reference's own sums.

The launch shapes are the planner's kinds (warp teams, block teams, clusters, the two-pass
kernel) at the emulator's sizes; every kernel built here is an instantiation of
gpuce._cuda.distill.variants().
"""

import ctypes
import zlib

import numpy as np
import pytest

from helpers import simt_library
from gpuce._cuda import distill as DK
from gpuce._cuda import fused as F

ml_dtypes = pytest.importorskip("ml_dtypes")

DEV = F.Device(arch=90, sms=2, smem_optin=227 * 1024)
NP = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}
TINY = {"float32": 2.0**-60, "float64": 2.0**-900}


def _plan(kind, dtype, vec, c, threads, group=0, cluster=0):
    """A DisPlan at the emulator's size: the ring plan of cross-entropy's probability-target
    variant of the same kind (two streams a ring; room for one more pack a row: rows here
    start anywhere in their 16-byte granules)."""
    v = DK.DisVariant(kind, dtype, vec, group, cluster)
    ce = F.Variant(kind, dtype, "prob", "int32", vec, group, cluster)
    if kind == "twopass":
        return DK.DisPlan(v, F.Plan(ce, threads))
    shape = F._team_plan(ce, c + vec - 1, threads, DEV)
    assert shape is not None, (v, c, threads)
    return DK.DisPlan(v, shape)


# (plan, C, grid): every kind, every dtype, 16-byte packs and a value a pack, rows of a few
# values, of C not a multiple of the pack, and of hundreds to thousands
CASES = [
    (_plan("warp", "float32", 4, 5, 64, group=4), 5, 2),
    (_plan("warp", "float32", 4, 37, 64, group=8), 37, 2),
    (_plan("warp", "bfloat16", 8, 300, 64, group=32), 300, 2),
    (_plan("warp", "float16", 8, 77, 64, group=16), 77, 1),
    (_plan("warp", "float64", 2, 37, 64, group=8), 37, 1),
    (_plan("block", "float32", 4, 333, 64), 333, 3),
    (_plan("block", "float32", 1, 29, 32), 29, 2),
    (_plan("block", "bfloat16", 1, 1001, 64), 1001, 2),
    (_plan("block", "float64", 1, 100, 64), 100, 2),
    (_plan("block", "float16", 8, 500, 64), 500, 2),
    (_plan("cluster", "float32", 4, 1000, 64, cluster=2), 1000, 4),
    (_plan("cluster", "bfloat16", 8, 2000, 32, cluster=4), 2000, 4),
    (_plan("twopass", "float32", 4, 1001, 64), 1001, 3),
    (_plan("twopass", "float64", 1, 999, 64), 999, 2),
    (_plan("twopass", "bfloat16", 8, 304, 64), 304, 2),
    (_plan("twopass", "float16", 8, 37, 32), 37, 2),
]


def _case_id(case):
    p, c, _ = case
    return f"{p.variant.describe()}-{p.variant.dtype}-C{c}"


def _wrapper(i, p):
    v = p.variant
    t, a = F.CT[v.dtype], F.CT[F.ACC[v.dtype]]
    ring = ", P, S" if v.kind in ("warp", "block", "cluster") else ""
    return f'''
extern "C" void run_{i}(unsigned cluster, unsigned grid, unsigned block, size_t shm, const void* s, long long lds,
                        const void* t, long long ldt, const void* active, long long n, int c, double cap,
                        double inv_tau, int reverse, double scale, const void* rs, void* loss, void* redo,
                        void* count, void* grad, long long ldg, long long* ws, int P, int S) {{
    simt_launch(grid, block, shm, [=] {{
        {v.expr()}((const {t}*)s, lds, (const {t}*)t, ldt, (const unsigned char*)active, n, c, ({a})cap,
                   ({a})inv_tau, reverse, ({a})scale, (const {a}*)rs, ({a}*)loss, (unsigned char*)redo,
                   (double*)count, ({t}*)grad, ldg, ws{ring});
    }}, cluster);
}}'''


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """gpuce_distill.cu (its headers pasted) built for the emulator: simt_library builds the
    fused program's text, pointed here at the distillation kernels' file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "SOURCE", DK.SOURCE)
        return simt_library(tmp_path_factory.mktemp("distill"),
                            "".join(_wrapper(i, p) for i, (p, _, _) in enumerate(CASES)))


def _inputs(rng, dtype, n, c, big, ld):
    """Student and teacher logits (views of (n, ld) storages: rows start anywhere in their
    16-byte granules) with adversarial rows, and the active mask (every seventh row off)."""
    dt = NP[dtype]
    ss = (rng.standard_normal((n, ld)) * 3).astype(dt)
    ts = (ss.astype(np.float64) + rng.standard_normal((n, ld)) * 1.5).astype(dt)
    s, t = ss[:, :c], ts[:, :c]
    active = np.ones(n, bool)
    active[::7] = False
    s[0, :] = np.nan  # an inactive row whatever it holds
    h = min(c, 3)
    s[1, :h] = np.array([big, big - 1, -big])[:h].astype(dt)  # huge values in both
    t[1, :h] = np.array([big - 0.5, big, -big])[:h].astype(dt)
    s[2, 0] = -np.inf  # a student entry at -inf under a finite teacher's: β = 0 gives +inf
    s[3, c // 2] = np.nan  # a NaN row
    t[4, c - 1] = np.inf  # a +inf teacher row (softcap: a finite one)
    t[5, :] = s[5, :]  # student == teacher: 0 and a zero gradient
    s[6, :] = -np.inf  # the student all -inf (softcap: ties)
    t[8, :] = -np.inf  # the teacher all -inf
    s[9, :] = -np.inf  # both all -inf
    t[9, :] = -np.inf
    t[10, :] = (s[10, :].astype(np.float64) + 200.0).astype(dt)  # maxima far apart (τ ≠ 1: still far)
    s[11, ::3] = -np.inf  # -inf entries in both at the same columns
    t[11, ::3] = -np.inf
    s[12, :] = 7.0  # ties
    t[13, :] = -40.0
    t[13, c // 3] = 40.0  # a nearly one-hot teacher
    return ss, ts, s, t, active


def _reference(s, t, active, reverse, tau, cap, sig):
    """Float64 loss and gradient from the formulas; the rows the kernel leaves to the host."""
    S, T = s.astype(np.float64), t.astype(np.float64)
    n, c = S.shape
    with np.errstate(all="ignore"):
        u = (cap * np.tanh(S / cap) if cap else S) / tau
        w = (cap * np.tanh(T / cap) if cap else T) / tau

        def logp(x):
            m = x.max(axis=1)
            ms = np.where(np.isfinite(m), m, 0.0)
            lse = ms + np.log(np.exp(x - ms[:, None]).sum(axis=1))
            return x - lse[:, None], np.isfinite(m)

        lq, fs = logp(u)
        lp, ft = logp(w)
        q, p = np.exp(lq), np.exp(lp)
        if reverse:
            loss = np.where(q > 0, q * (lq - lp), 0.0).sum(axis=1)
            g = np.where(q > 0, q * ((lq - lp) - loss[:, None]), 0.0)
        else:
            loss = np.where(p > 0, p * (lp - lq), 0.0).sum(axis=1)
            g = q - p
        g = g * (np.asarray(sig, np.float64).reshape(-1, 1) if np.ndim(sig) else sig) / tau
        if cap:
            g = g * (1.0 - np.tanh(S / cap) ** 2)
        # the kernel's one shift: the larger maximum of the two rows
        mm = np.maximum(u.max(axis=1), w.max(axis=1))
        mfin = np.isfinite(mm) & ~np.isnan(u).any(axis=1) & ~np.isnan(w).any(axis=1)
        msh = np.where(mfin, mm, 0.0)
        sums = np.exp(u - msh[:, None]).sum(axis=1), np.exp(w - msh[:, None]).sum(axis=1)
    bad = ~(fs & ft)
    loss[bad] = np.nan
    g[bad] = np.nan
    loss[~active] = 0.0
    g[~active] = 0.0
    return loss, g, mfin, sums


# loss and gradient tolerances (relative; absolute scaled by the gradient's size)
RTOL = {"float16": 1e-3, "bfloat16": 2.0**-8, "float32": 2e-5, "float64": 1e-10}

# name: (reverse, tau, softcap, gradient, per-row sigma)
OPTIONS = {
    "forward": (0, 1.0, 0.0, True, False),
    "reverse": (1, 1.0, 0.0, True, True),
    "forward-loss-only": (0, 1.0, 0.0, False, False),
    "forward-temperature-softcap": (0, 1.7, 5.0, True, True),
    "reverse-temperature": (1, 0.6, 0.0, True, False),
    "reverse-softcap": (1, 1.0, 3.0, True, True),
}


def _run(lib, case, option, *, inplace=False, n=23, grid=None):
    p, c, g0 = CASES[case]
    v = p.variant
    reverse, tau, cap, want_grad, per_row = OPTIONS[option]
    rng = np.random.default_rng(zlib.crc32(f"{case}-{option}-{inplace}-{n}".encode()))
    exact = tau == 1.0 and not cap and v.dtype in ("float32", "float64")
    big = 1e4 if exact else 60.0
    ld = c + int(rng.integers(0, 5))
    ss, ts, s, t, active = _inputs(rng, v.dtype, n, c, big, ld)
    s0, t0, ss0 = s.copy(), t.copy(), ss.copy()
    acc = np.dtype(F.ACC[v.dtype])
    sig = (rng.random(n) + 0.5).astype(acc) if per_row else acc.type(0.75)
    loss = np.full(n, -7.0, acc)  # poisoned: every row must be written
    redo = np.zeros(n, np.uint8)
    count = np.zeros(1, np.float64)
    gstore = None
    if want_grad:
        gstore = ss if inplace else np.full((n, ld), -7.0, ss.dtype)
    ws = np.zeros(F.WS_PARTIALS + F.WS_WORDS * 64, np.int64)
    ptr = lambda a: ctypes.c_void_p(None if a is None else a.ctypes.data)  # noqa: E731
    act8 = active.astype(np.uint8)
    fn = getattr(lib, f"run_{case}")
    fn.restype = None
    fn(ctypes.c_uint(max(1, v.cluster)), ctypes.c_uint(grid or g0), ctypes.c_uint(p.threads),
       ctypes.c_size_t(p.smem), ptr(ss), ctypes.c_longlong(ld), ptr(ts), ctypes.c_longlong(ld), ptr(act8),
       ctypes.c_longlong(n), ctypes.c_int(c), ctypes.c_double(cap), ctypes.c_double(1.0 / tau),
       ctypes.c_int(reverse), ctypes.c_double(0.0 if per_row else float(sig)), ptr(sig if per_row else None),
       ptr(loss), ptr(redo), ptr(count), ptr(gstore), ctypes.c_longlong(ld if want_grad else 0),
       ctypes.cast(ws.ctypes.data, ctypes.POINTER(ctypes.c_longlong)),
       ctypes.c_int(p.shape.packs), ctypes.c_int(p.shape.stages))
    assert ws[0] == 0  # the ticket is reset for the next launch
    want = _reference(s0, t0, active, reverse, tau, cap, sig)
    grad = None if gstore is None else gstore[:, :c]
    return dict(v=v, c=c, active=active, loss=loss, redo=redo.astype(bool), count=count[0], grad=grad,
                gstore=gstore, ss0=ss0, s0=s0, want=want)


def _check(r):
    v, active = r["v"], r["active"]
    want_loss, want_grad, mfin, (sum_s, sum_t) = r["want"]
    acc = F.ACC[v.dtype]
    tiny = TINY[acc]
    # the rows left to the host: active, the one shift finite, a stream's sum under TINY
    expect_redo = active & mfin & ((sum_s < tiny) | (sum_t < tiny))
    np.testing.assert_array_equal(r["redo"], expect_redo)
    assert r["count"] == expect_redo.sum()
    keep = ~expect_redo
    assert np.isnan(r["loss"][expect_redo]).all()
    rtol = RTOL[acc]
    np.testing.assert_allclose(r["loss"][keep], want_loss[keep], rtol=rtol, atol=rtol)
    if r["grad"] is not None:
        g = r["grad"].astype(np.float64)
        bad = np.isnan(want_loss) & keep
        fine = keep & ~bad
        gt = RTOL[v.dtype]
        scale = np.nanmax(np.abs(want_grad[fine]), initial=1.0)
        np.testing.assert_allclose(g[fine], want_grad[fine], rtol=gt, atol=gt * scale)
        assert np.isnan(g[bad]).all()
        assert (g[~active] == 0).all()
        # a row left to the host keeps what its gradient row held (the logits when in place)
        left = r["ss0"][:, : r["c"]][expect_redo] if r["gstore"] is r.get("inplace_store") else None
        if left is not None:
            np.testing.assert_array_equal(r["grad"][expect_redo], left)
        else:
            assert (r["gstore"][expect_redo] == -7.0).all()


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("case", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_distill_kernel_on_host(lib, case, option):
    """The loss and the gradient of a launch against the float64 reference."""
    r = _run(lib, case, option)
    _check(r)
    loss, cap = r["loss"], OPTIONS[option][2]
    assert loss[0] == 0.0  # an inactive row of NaNs
    assert np.isnan(loss[3])  # a NaN row
    assert abs(loss[5]) <= 1e-6  # student == teacher
    if r["grad"] is not None:
        assert np.abs(r["grad"][5].astype(np.float64)).max() <= 1e-6
    if not cap:
        assert np.isnan(loss[[4, 9]]).all()  # a +inf teacher value; both streams all -inf
        assert r["redo"][[6, 8]].all()  # one stream all -inf
        # maxima 200 / τ apart: left to the host in float, computed in double
        assert r["redo"][10] == (F.ACC[r["v"].dtype] == "float32")
        if not OPTIONS[option][0]:
            assert loss[2] == np.inf  # the student's -inf under the teacher's mass


@pytest.mark.parametrize("option", ["forward", "reverse-softcap"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_gradient_in_place(lib, case, option):
    """The gradient written over the student's logits (rows strided in one storage): the same
    results, the columns past C untouched, and the rows left to the host still the logits."""
    r = _run(lib, case, option, inplace=True)
    r["inplace_store"] = r["gstore"]
    _check(r)
    c = r["c"]
    np.testing.assert_array_equal(r["gstore"][:, c:], r["ss0"][:, c:])


@pytest.mark.parametrize("case", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_one_team_walks_many_rows(lib, case):
    """One block (one cluster) for 150 rows: every team walks its ring many times, reusing its
    slots, parity buffers and cluster tags row after row."""
    p = CASES[case][0]
    _check(_run(lib, case, "reverse-temperature", n=150, grid=max(1, p.variant.cluster)))


def test_every_case_is_an_instantiation():
    """The emulated kernels are in the compile list, and each ring holds a row."""
    compiled = set(DK.variants())
    for p, c, _ in CASES:
        assert p.variant in compiled
        if p.variant.kind != "twopass":
            nt = p.variant.group or p.threads * max(1, p.variant.cluster)
            assert p.shape.packs * nt * p.variant.vec >= c + p.variant.vec - 1


def test_planner_keeps_only_instantiations():
    """Every plan the distillation planner offers is compiled; rows of every length have one
    (the two-pass kernel last), and no plan is a tile or a register stage."""
    for dtype in F.DTYPES:
        for c in (1, 5, 37, 300, 4096, 50257, 262144):
            for vec in (1, F.VEC_MAX[dtype]):
                plans = DK.candidates(dtype, c, vec, DEV, c % vec != 0)
                assert plans and plans[-1].variant.kind == "twopass"
                assert all(p.variant in set(DK.variants()) for p in plans)


def test_jsd_is_left_to_the_array_path():
    """0 < β < 1 raises NotImplementedError before anything is launched (the caller falls back)."""
    from gpuce._validation import DistillArgs

    args = DistillArgs(lead_shape=(2,), n=2, c=3, acc=np.dtype(np.float32), beta=0.5, temperature=1.0,
                       softcap=0.0, ignore_index=-100, reduction="none", return_grad=False, sparse=False)
    with pytest.raises(NotImplementedError):
        DK.distill_rows_fused(None, None, args, None, None)
