"""The fused RawKernels executed on the host by a small SIMT emulator (tests/host/simt.h).

Each CUDA thread runs as a std::thread; barriers, warp shuffles, per-block shared memory,
thread-block clusters (block_rank, cluster sync, stores into a peer's shared memory) and the
atomic ticket are emulated, so the kernels' own indexing, 16-byte packs, shared-memory rings,
team merges, cluster exchanges and the last block's batch sums run here, on launch shapes
from gpuce._cuda.fused's planner, and are compared with the float64 reference: loss rows, lse,
per-row correctness, the gradient, the batch total, the z-loss part, the accuracy and the
first bad label.
"""

import ctypes
import zlib

import numpy as np
import pytest

import reference as R
from helpers import simt_library
from gpuce._cuda import fused as F

ml_dtypes = pytest.importorskip("ml_dtypes")

DEV = F.Device(arch=90, sms=2, smem_optin=227 * 1024)
NP_DTYPE = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}


def V(kind, dtype, target, vec, **kw):
    index = "int32" if target in ("int32", "prob") else "int64"
    return F.Variant(kind, dtype, "prob" if target == "prob" else "label", index, vec, **kw)


def team(v, c, threads):
    """The ring plan of ``v`` for rows of ``c`` (dense rows whose C is not a multiple of the
    pack start off a 16-byte boundary: one more pack a row at most)."""
    p = F._team_plan(v, c + v.vec - 1 if c % v.vec else c, threads, DEV)
    assert p is not None, (v, c, threads)
    return p


def tile(v, c):
    return F.tile_plan(v, c)


# (plan, C, grid): every kind, pack widths 1 and 16 bytes, sub-warp teams, rings of 2 and 3
# stages, clusters of 2 to 8, every dtype and target kind
CASES = [
    (tile(V("tile", "float32", "int64", 4), 10), 10, 2),  # 128-row tiles with a scalar tail
    (tile(V("tile", "float32", "int32", 1), 7), 7, 1),
    (tile(V("tile", "float16", "prob", 8), 32), 32, 1),  # C % 4 == 0: rows read from column t % C on
    (tile(V("tile", "bfloat16", "int64", 8), 16), 16, 2),
    (tile(V("tile", "float64", "int64", 2), 5), 5, 1),
    (tile(V("tile", "float32", "int64", 4), 32), 32, 2),
    (tile(V("tile", "bfloat16", "int32", 1), 12), 12, 1),  # 2-byte values one at a time: copied through registers
    (tile(V("tile", "float32", "int64", 4), 100), 100, 2),  # a wide-row candidate (33..128 values)
    (team(V("warp", "float32", "int64", 4, group=4), 12, 64), 12, 2),  # 16 rows a block
    (team(V("warp", "float32", "int64", 4, group=4), 100, 64), 100, 2),  # the half-lane candidate: 7 packs a lane
    (team(V("warp", "float32", "int32", 4, group=32), 500, 64), 500, 2),
    (team(V("warp", "float32", "prob", 4, group=8), 100, 64), 100, 1),
    (team(V("warp", "float16", "int64", 8, group=16), 480, 64), 480, 2),
    (team(V("warp", "bfloat16", "prob", 8, group=4), 64, 64), 64, 1),
    (team(V("warp", "float64", "int64", 2, group=8), 60, 64), 60, 1),
    (team(V("block", "float32", "int64", 4), 3000, 64), 3000, 3),
    (team(V("block", "float32", "int32", 1), 1001, 64), 1001, 2),  # unaligned rows: 1 value a pack
    (team(V("block", "float16", "int64", 1), 333, 64), 333, 2),  # 2-byte values: no cp.async form
    (team(V("block", "bfloat16", "prob", 8), 2048, 64), 2048, 2),
    (team(V("block", "float64", "prob", 1), 777, 64), 777, 2),
    (F.Plan(V("twopass", "float32", "int64", 4), 64), 4096, 3),
    (F.Plan(V("twopass", "float64", "int32", 1), 64), 999, 2),
    (F.Plan(V("twopass", "bfloat16", "prob", 8), 64), 304, 2),
    (team(V("cluster", "float32", "int64", 4, cluster=2), 1000, 64), 1000, 4),
    (team(V("cluster", "float16", "prob", 8, cluster=4), 4096, 64), 4096, 4),
    (team(V("cluster", "bfloat16", "int32", 8, cluster=8), 8192, 32), 8192, 8),
    (team(V("cluster", "float32", "prob", 4, cluster=2), 6000, 64), 6000, 2),
    # dense rows that start off a 16-byte boundary: aligned granules, edge packs masked
    (team(V("block", "float32", "int64", 4), 1001, 64), 1001, 2),
    (team(V("warp", "bfloat16", "int32", 8, group=16), 333, 64), 333, 2),
    (team(V("warp", "float16", "prob", 8, group=8), 77, 64), 77, 1),
    (team(V("cluster", "bfloat16", "int64", 8, cluster=2), 5003, 64), 5003, 2),
    (F.Plan(V("twopass", "float32", "int64", 4), 64), 1001, 2),
    (F.Plan(V("twopass", "float16", "prob", 8), 64), 999, 2),
    # twopass over a cluster: slices interleaved over CL blocks, only the partials exchanged
    (F.Plan(V("twopass", "float32", "int64", 4, cluster=4), 64), 4096, 8),
    (F.Plan(V("twopass", "bfloat16", "prob", 8, cluster=8), 32), 5003, 8),
    (F.Plan(V("twopass", "float16", "int32", 8, cluster=4), 64), 999, 4),
    # the register stage: 16 packs a thread in registers, one shared-memory stage
    (team(V("cluster", "float32", "int64", 4, cluster=8, regs=16), 12000, 32), 12000, 8),
    (team(V("cluster", "float32", "int32", 4, cluster=8, regs=16), 16384, 32), 16384, 8),
]


def _case_id(case):
    p, c, g = case
    return f"{p.variant.describe()}-{p.variant.dtype}-{p.variant.target}-{p.variant.index}-C{c}-P{p.packs}S{p.stages}"


def _wrapper(i, p):
    v = p.variant
    t, a, lab = F.CT[v.dtype], F.CT[F.ACC[v.dtype]], F.CT[v.index]
    extra = ", P, S" if v.kind in ("warp", "block", "cluster") else ""
    return f'''
extern "C" void run_{i}(unsigned cluster, unsigned grid, unsigned block, size_t shm, const void* x, long long ldx,
                        const void* labels, const void* y, long long ldy, const void* w, long long n, int c,
                        double eps_over_c, double ome, double z, double cap, long long ign, double inv, int inv_ws,
                        void* loss, void* lse, void* correct, void* grad, long long ldg, long long* ws,
                        void* total, void* stats, long long* bad, int P, int S) {{
    simt_launch(grid, block, shm, [=] {{
        {v.expr()}((const {t}*)x, ldx, (const {lab}*)labels, (const {t}*)y, ldy, (const {a}*)w, n, c,
                   ({a})eps_over_c, ({a})ome, ({a})z, ({a})cap, ign, inv, inv_ws, ({a}*)loss, ({a}*)lse,
                   ({a}*)correct, ({t}*)grad, ldg, ws, ({a}*)total, ({a}*)stats, bad{extra});
    }}, cluster);
}}'''


def _prologue_wrapper():
    out = []
    for index in ("int32", "int64"):
        for acc in ("float32", "float64"):
            expr = F.prologue_expr(index, acc)
            out.append(f'''
extern "C" void prologue_{index}_{acc}(unsigned grid, unsigned block, const void* labels, const void* w, long long n,
                                       int c, long long ign, int denominator, long long* ws) {{
    simt_launch(grid, block, 0, [=] {{ {expr}((const {F.CT[index]}*)labels, (const {F.CT[acc]}*)w, n, c, ign,
                                              denominator, ws); }});
}}''')
    return "".join(out)


def _tile_ring_wrapper(i, p):
    v = p.variant
    prob = "true" if v.target == "prob" else "false"  # a second stream (Y), else the keys (KEYS)
    keys = "false" if v.target == "prob" else "true"
    return f'''
extern "C" int tile_ring_{i}(int c) {{
    int vb;
    return GPUCE_TILE_STAGES * gpuce::tile_stage_bytes<{F.CT[v.dtype]}, {F.CT[v.index]}, {prob}, {keys}>(c, vb);
}}'''


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    body = "".join(_wrapper(i, p) for i, (p, _, _) in enumerate(CASES)) + _prologue_wrapper()
    body += "".join(_tile_ring_wrapper(i, p) for i, (p, _, _) in enumerate(CASES) if p.variant.kind == "tile")
    return simt_library(tmp_path_factory.mktemp("simt"), body)


def _inputs(rng, v, n, c):
    dt = NP_DTYPE[v.dtype]
    x = (rng.standard_normal((n, c)) * 3).astype(dt)
    big = 60.0 if v.dtype == "float16" else 1e4
    x[1, : min(c, 3)] = np.array([big, big - 1, -big])[: min(c, 3)].astype(dt)
    x[2, 0] = -np.inf
    x[3, c // 2] = np.nan
    x[4, :] = x[4, 0]  # ties everywhere: the label attains the max
    if v.target == "prob":
        t = rng.random((n, c))
        t[2, 0] = 0.0  # zero mass on the -inf logit
        t = (t / t.sum(1, keepdims=True)).astype(dt)
    else:
        t = rng.integers(0, c, n).astype(np.int32 if v.index == "int32" else np.int64)
        t[2] = 1 % c
        t[::5] = -100
        t[7] = int(np.argmax(x[7].astype(np.float64)))  # a correct prediction
    return x, t


def _reference(x, t, v, w, eps, z, cap):
    """Float64 loss rows, gradient (of the sum of rows), lse, z parts and correctness."""
    xf = x.astype(np.float64)
    g = cap * np.tanh(xf / cap) if cap else xf
    kind = "prob" if v.target == "prob" else "label"
    tt = t.astype(np.float64) if kind == "prob" else t
    loss, grad = R.sce(g, tt, kind=kind, weight=w, label_smoothing=eps, z_loss=z, reduction="none")
    if cap:
        grad = grad * (1.0 - np.tanh(xf / cap) ** 2)
    with np.errstate(invalid="ignore"):
        lse = np.array([R.lse_row(r) for r in g])
    active = (t != -100) if kind == "label" else np.ones(len(x), bool)
    correct = np.zeros(len(x))
    if kind == "label":
        for i in np.flatnonzero(active):
            correct[i] = float(not np.isnan(g[i]).any() and g[i, t[i]] == g[i].max())
    zpart = np.where(active, z * lse**2, 0.0) if z else np.zeros(len(x))  # no z-loss: a zero part, NaN rows too
    return loss, grad, lse, zpart, correct, active


RTOL = {"float16": 3e-3, "bfloat16": 2e-2, "float32": 2e-5, "float64": 1e-11}


def _run(lib, case, *, weighted, eps, z, cap, reduction, n=37, grid=None, bad_row=None, bad_weight=None):
    p, c, g0 = CASES[case]
    v = p.variant
    rng = np.random.default_rng(zlib.crc32(f"{case}-{weighted}-{eps}-{z}-{cap}-{reduction}-{n}".encode()))
    x, t = _inputs(rng, v, n, c)
    if bad_row is not None:
        t[bad_row] = c + 5
        t[bad_row + 3] = -7
    acc = np.dtype(F.ACC[v.dtype])
    w = (rng.random(c) + 0.5).astype(acc) if weighted else None
    if bad_weight is not None:
        w[bad_weight[0]] = bad_weight[1]
        w[bad_weight[0] + 1] = np.nan  # the first one is reported
    loss = np.full(n, -7.0, acc)  # poisoned: every row must be written
    lse = np.full(n, -7.0, acc)
    correct = np.full(n, -7.0, acc)
    grad = np.full((n, c), -7.0, x.dtype)
    total = np.full(1, -7.0, acc)
    stats = np.full(2, -7.0, acc)
    bad = np.full(2, -7, np.int64)
    ws = np.zeros(F.WS_PARTIALS + F.WS_WORDS * 64, np.int64)
    labels = t if v.target != "prob" else np.zeros(n, np.int32)
    y = t if v.target == "prob" else x[:1]
    ptr = lambda a: ctypes.c_void_p(a.ctypes.data)  # noqa: E731
    inv, inv_ws = 1.0, 0
    active = (t != -100) if v.target != "prob" else np.ones(n, bool)
    denominator = reduction == "mean" and v.target != "prob"
    if reduction == "mean" and v.target == "prob":
        inv = 1.0 / n
    if denominator or weighted:  # the prologue, as the host runs it
        fn = getattr(lib, f"prologue_{v.index}_{acc.name}")
        fn.restype = None
        w_ptr = ptr(w) if weighted else ctypes.c_void_p(None)
        lab_ptr = ptr(labels) if v.target != "prob" else ctypes.c_void_p(None)
        fn(ctypes.c_uint(3 if denominator else 1), ctypes.c_uint(64), lab_ptr, w_ptr, ctypes.c_longlong(n),
           ctypes.c_int(c), ctypes.c_longlong(-100), ctypes.c_int(int(denominator)),
           ctypes.cast(ws.ctypes.data, ctypes.POINTER(ctypes.c_longlong)))
        assert ws[4] == (bad_weight[0] + 1 if bad_weight is not None else 0)
        if denominator:
            ok = active & (t >= 0) & (t < c)
            want = (w[t[ok]].astype(np.float64).sum() if weighted else float(ok.sum()))
            got = ws[3:4].view(np.float64)[0]
            if bad_weight is None:
                np.testing.assert_allclose(got, 1.0 / want, rtol=1e-12)
            assert ws[1] == 0  # the ticket is reset
            inv_ws = 1
            inv = got
    fn = getattr(lib, f"run_{case}")
    fn.restype = None
    grid = grid or g0
    cl = max(1, v.cluster)
    lp = ctypes.POINTER(ctypes.c_longlong)
    fn(ctypes.c_uint(cl), ctypes.c_uint(grid), ctypes.c_uint(p.threads), ctypes.c_size_t(p.smem), ptr(x),
       ctypes.c_longlong(c), ptr(labels), ptr(y), ctypes.c_longlong(c if v.target == "prob" else 0),
       ptr(w) if weighted else ctypes.c_void_p(None), ctypes.c_longlong(n), ctypes.c_int(c),
       ctypes.c_double(eps / c), ctypes.c_double(1 - eps), ctypes.c_double(z), ctypes.c_double(cap or 0.0),
       ctypes.c_longlong(-100), ctypes.c_double(inv), ctypes.c_int(inv_ws), ptr(loss), ptr(lse), ptr(correct),
       ptr(grad), ctypes.c_longlong(c), ctypes.cast(ws.ctypes.data, lp), ptr(total), ptr(stats),
       ctypes.cast(bad.ctypes.data, lp), ctypes.c_int(p.packs), ctypes.c_int(p.stages))
    assert ws[0] == 0 and ws[4] == 0  # the ticket and the weight check are reset for the next launch
    return x, t, w, loss, lse, correct, grad, total, stats, bad, inv, active


@pytest.mark.parametrize("case", range(len(CASES)), ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("options", ["none-weighted-smoothed-zloss", "mean-plain", "sum-softcap"])
def test_fused_kernel_on_host(lib, case, options):
    """Every output of a launch against the float64 reference.  "none-weighted-smoothed-zloss":
    weights, label smoothing, z-loss (every coefficient path); "mean-plain": no weight (a null
    pointer), the denominator prologue; "sum-softcap": logits capped at 3 tanh(f / 3)."""
    p, c, _ = CASES[case]
    v = p.variant
    weighted = options.startswith("none")
    eps, z = (0.1, 1e-3) if weighted else (0.0, 0.0)
    cap = 3.0 if "softcap" in options else None
    if cap and v.regs:  # no softcap path in the register stage: never planned for a softcap call
        assert not any(q.variant.regs for q in F.candidates(v.dtype, v.target, v.index, c, v.vec,
                                                            DEV, softcap=True))
        return
    reduction = options.split("-")[0]
    x, t, w, loss, lse, correct, grad, total, stats, bad, inv, active = _run(
        lib, case, weighted=weighted, eps=eps, z=z, cap=cap, reduction=reduction)
    ref_loss, ref_grad, ref_lse, ref_z, ref_correct, _ = _reference(
        x, t, v, None if w is None else w.astype(np.float64), eps, z, cap)
    rtol = RTOL[v.dtype]
    scale = inv
    np.testing.assert_allclose(loss, np.where(active, ref_loss, 0.0), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad * scale, rtol=rtol, atol=rtol * max(scale, 1e-3))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=rtol)  # every row, ignored ones too
    assert not np.isfinite(lse[~finite]).any()
    if v.target != "prob":
        np.testing.assert_array_equal(correct[active], ref_correct[active])
        assert np.isnan(correct[~active]).all()
    ref_total = np.nansum(np.where(active, ref_loss, 0.0)) if not np.isnan(ref_loss[active]).any() else np.nan
    np.testing.assert_allclose(total[0], ref_total * inv, rtol=max(rtol, 1e-6), equal_nan=True)
    np.testing.assert_allclose(stats[0], np.nansum(ref_z) * inv if not np.isnan(ref_z).any() else np.nan,
                               rtol=max(rtol, 1e-6), atol=1e-9, equal_nan=True)
    want_acc = ref_correct[active].sum() / active.sum() if v.target != "prob" else 0.0
    np.testing.assert_allclose(stats[1], want_acc, rtol=1e-6)
    assert bad[0] == len(x) and bad[1] == -1  # no bad label (N), no bad weight (-1)


@pytest.mark.parametrize("case", [i for i, (p, _, _) in enumerate(CASES) if p.variant.target != "prob"],
                         ids=[_case_id(c) for c in CASES if c[0].variant.target != "prob"])
def test_bad_labels_give_nan_rows_and_the_first_position(lib, case):
    """A label outside [0, C): a NaN row (never an out-of-bounds read), and the first bad
    position reaches bad_out through the blocks' partials."""
    x, t, w, loss, lse, correct, grad, total, stats, bad, inv, active = _run(
        lib, case, weighted=True, eps=0.0, z=0.0, cap=None, reduction="none", bad_row=9)
    assert bad[0] == 9
    assert np.isnan(loss[[9, 12]]).all() and np.isnan(grad[[9, 12]].astype(np.float64)).all()
    ok = active.copy()
    ok[[9, 12]] = False
    assert np.isfinite(loss[ok & np.isfinite(lse)]).all()


@pytest.mark.parametrize("case", range(len(CASES)), ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("bad_value", [-np.inf, np.nan, np.inf])
def test_bad_class_weight_gives_nan_results_and_its_index(lib, case, bad_value):
    """A class weight that is NaN or infinite: the prologue finds the first one, the
    fused kernel turns every active row and the total into NaN (never a silently wrong number)
    and reports its index for the host's ValueError."""
    x, t, w, loss, lse, correct, grad, total, stats, bad, inv, active = _run(
        lib, case, weighted=True, eps=0.0, z=0.0, cap=None, reduction="mean", bad_weight=(3, bad_value))
    assert bad[1] == 3
    assert np.isnan(total[0])
    assert np.isnan(grad[active].astype(np.float64)).all()


@pytest.mark.parametrize("case", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_one_team_walks_many_rows(lib, case):
    """One block (one cluster) for 150 rows (a tile kernel: 600 rows, four whole tiles and a
    partial one): every team walks its ring many times, reusing its slots, its parity buffers
    and its cluster tags row after row."""
    p, c, _ = CASES[case]
    v = p.variant
    n = 600 if v.kind == "tile" else 150
    x, t, w, loss, lse, correct, grad, total, stats, bad, inv, active = _run(
        lib, case, weighted=True, eps=0.1, z=1e-3, cap=None, reduction="sum", n=n, grid=max(1, v.cluster))
    ref_loss, ref_grad, *_ = _reference(x, t, v, w.astype(np.float64), 0.1, 1e-3, None)
    rtol = RTOL[v.dtype]
    np.testing.assert_allclose(loss, np.where(active, ref_loss, 0.0), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad, rtol=rtol, atol=rtol)


def test_every_case_is_compiled_and_planned():
    """The emulated variants are in the compile list, and each plan's ring holds a row (one
    more pack for rows that start off a 16-byte boundary)."""
    compiled = set(F.variants())
    for p, c, _ in CASES:
        assert p.variant in compiled
        if p.variant.kind in ("warp", "block", "cluster"):
            nt = p.variant.group or p.threads * max(1, p.variant.cluster)
            v = p.variant.vec
            assert p.packs * nt * v >= (c + v - 1 if c % v else c)


@pytest.mark.parametrize("case", [i for i, (p, _, _) in enumerate(CASES) if p.variant.kind == "tile"],
                         ids=[_case_id(c) for c in CASES if c[0].variant.kind == "tile"])
def test_tile_ring_lean_path_over_many_tiles(lib, case):
    """The tile kernel's lean path (no weights, smoothing or softcap) with "mean" over 1000 rows
    on two blocks: tiles land in every stage of the ring several times, the last one partial."""
    p, c, _ = CASES[case]
    v = p.variant
    x, t, w, loss, lse, correct, grad, total, stats, bad, inv, active = _run(
        lib, case, weighted=False, eps=0.0, z=0.0, cap=None, reduction="mean", n=1000, grid=2)
    ref_loss, ref_grad, ref_lse, *_ = _reference(x, t, v, None, 0.0, 0.0, None)
    rtol = RTOL[v.dtype]
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad * inv, rtol=rtol, atol=rtol * max(inv, 1e-3))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=rtol)
    want = np.nansum(np.where(active, ref_loss, 0.0)) * inv if not np.isnan(ref_loss[active]).any() else np.nan
    np.testing.assert_allclose(total[0], want, rtol=max(rtol, 1e-6), equal_nan=True)


@pytest.mark.parametrize("case", [i for i, (p, _, _) in enumerate(CASES) if p.variant.kind == "tile"],
                         ids=[_case_id(c) for c in CASES if c[0].variant.kind == "tile"])
def test_tile_ring_size_is_the_kernels(lib, case):
    """The host's ring size (tile_plan, the launch's shared memory) is the kernel's own layout
    (tile_stage_bytes), for every row length the tile takes."""
    v = CASES[case][0].variant
    fn = getattr(lib, f"tile_ring_{case}")
    fn.restype = ctypes.c_int
    for c in range(1, F.TILE_WIDE_C + 1):
        assert fn(ctypes.c_int(c)) == F.tile_plan(v, c).smem, c
