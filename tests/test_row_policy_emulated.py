"""The fused kernels' bodies and merges with a second row-state policy, in the SIMT emulator.

tests/host/lse_policy.cuh is a policy written against the interface alone (a state of three
words, no keys, no second stream, two batch sums): each row's log-sum-exp, softcap first, and
its gradient (the softmax, times 1 - tanh^2 with softcap).  The unchanged bodies of
kernels/gpuce_row_kernels.cuh (warp, block and cluster teams, the tile, the two-pass kernel
alone and over a cluster) and the merges and batch finish of kernels/gpuce_team.cuh run it
here, against float64: what a new loss mode is asked to write, and nothing else.
"""

import ctypes
from pathlib import Path

import numpy as np
import pytest

from helpers import rng_for, simt_library
from gpuce._cuda import fused as F

HERE = Path(__file__).resolve().parent
WS_WORDS = F.WS_PARTIALS + F.WS_WORDS * 64

# (name, body call, block, grid, cluster, VEC): every kernel body with the test policy
BODIES = [
    ("warp8", "team_rows<R, 4, 8, 1>(g, out, ws, P, S)", 64, 3, 1, 4),
    ("warp32", "team_rows<R, 4, 32, 1>(g, out, ws, P, S)", 64, 2, 1, 4),
    ("block", "team_rows<R, 4, 0, 1>(g, out, ws, P, S)", 64, 3, 1, 4),
    ("block_v1", "team_rows<R, 1, 0, 1>(g, out, ws, P, S)", 32, 2, 1, 1),
    ("cluster2", "team_rows<R, 4, 0, 2>(g, out, ws, P, S)", 32, 4, 2, 4),
    ("tile", "tile_rows<R, 4>(g, out, ws)", F.TILE_ROWS, 2, 1, 4),
    ("twopass", "twopass_rows<R, 4, 1>(g, out, ws)", 64, 3, 1, 4),
    ("twopass_cl4", "twopass_rows<R, 4, 4>(g, out, ws)", 32, 8, 4, 4),
]


def _wrapper(name, call):
    return f'''
extern "C" void lse_{name}(unsigned cluster, unsigned grid, unsigned block, size_t shm, const float* x, long long n,
                           int c, double cap, float* grad, float* lse, double* batch, long long* ws, int P, int S) {{
    simt_launch(grid, block, shm, [=] {{
        typedef gpuce::LseRow<float, int, float> R;
        const R::Args g = {{x, c, nullptr, nullptr, 0, n, c, (float)cap, grad, c, lse}};
        const R::Batch out = {{batch}};
        gpuce::{call};
    }}, cluster);
}}'''


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    policy = (HERE / "host" / "lse_policy.cuh").read_text()
    return simt_library(tmp_path_factory.mktemp("lse"), policy + "".join(_wrapper(n, b) for n, b, *_ in BODIES))


def _inputs(rng, n, c):
    x = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    x[1, : min(c, 3)] = np.array([1e4, 1e4 - 1, -1e4], np.float32)[: min(c, 3)]
    x[2, 0] = -np.inf
    x[3, c // 2] = np.nan
    x[4, :] = -np.inf  # lse -inf, gradient NaN
    x[5, :] = 7.0  # ties
    return x


def _reference(x, cap):
    """Float64 lse rows and the gradient of their sum, written out here."""
    xf = x.astype(np.float64)
    v = cap * np.tanh(xf / cap) if cap else xf
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(v, axis=1, keepdims=True)
        ms = np.where(np.isfinite(m), m, 0.0)
        e = np.exp(v - ms)
        s = e.sum(axis=1, keepdims=True)
        lse = (ms + np.log(s))[:, 0]
        grad = e / s
        if cap:
            grad = grad * (1.0 - np.tanh(xf / cap) ** 2)
    lse[np.isnan(v).any(axis=1)] = np.nan
    return lse, grad


# rows of 29 and 37 values (most start off a 16-byte boundary: edge packs) and of 300; the
# tile takes rows of at most 32
GRID = [(b, c, cap) for b in BODIES for c in (29, 37, 300) for cap in (0.0, 15.0)
        if b[0] != "tile" or c <= F.TILE_MAX_C]


@pytest.mark.parametrize("body,c,cap", GRID, ids=[f"{b[0]}-C{c}-cap{cap:g}" for b, c, cap in GRID])
def test_second_policy_runs_in_every_body(lib, body, c, cap):
    name, _, block, grid, cluster, vec = body
    n = 23
    x = _inputs(rng_for(name, c, cap), n, c)
    grad = np.full((n, c), -7.0, np.float32)
    lse = np.full(n, -7.0, np.float32)
    batch = np.full(2, -7.0)
    ws = np.zeros(WS_WORDS, np.int64)
    if name == "tile":
        shm, P, S = F.TILE_STAGES * (-(-F.TILE_ROWS * c * 4 // 16) * 16), 0, 0
    else:
        team = 8 if name == "warp8" else 32 if name == "warp32" else block * cluster
        P, S = -(-(-(-c // vec) + 1) // team), 2
        shm = 0 if name.startswith("twopass") else P * S * block * 4 * vec
    fn = getattr(lib, f"lse_{name}")
    fn.restype = None
    ptr = lambda a: ctypes.c_void_p(a.ctypes.data)  # noqa: E731
    fn(ctypes.c_uint(cluster), ctypes.c_uint(grid), ctypes.c_uint(block), ctypes.c_size_t(shm), ptr(x),
       ctypes.c_longlong(n), ctypes.c_int(c), ctypes.c_double(cap), ptr(grad), ptr(lse), ptr(batch), ptr(ws),
       ctypes.c_int(P), ctypes.c_int(S))
    want_lse, want_grad = _reference(x, cap)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-6, atol=2e-6)
    good = np.isfinite(want_lse)
    np.testing.assert_allclose(grad[good], want_grad[good], rtol=2e-5, atol=1e-7)
    assert np.isnan(grad[~good]).all()  # a NaN row, an all -inf row
    np.testing.assert_allclose(batch, [want_lse[good].sum(), good.sum()], rtol=1e-5)
    assert not ws[0] and not ws[1]  # the ticket is reset for the next launch
