"""bench/memcheck.py on the CPU: its case list covers every fused kernel kind, and its arrays
have the 16 spare bytes a side that keep the edge granules' reads inside a buffer (NumPy stands
in for CuPy: the script only allocates, slices and copies)."""

import numpy as np

from bench import memcheck


def test_the_cases_reach_every_kernel_kind(capsys):
    assert memcheck.main(["--list"]) == 0
    out = capsys.readouterr().out
    kinds = set(" ".join(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("ce ")).split())
    assert {"tile", "warp", "block", "cluster/CL2", "cluster/CL4", "cluster/CL8", "cluster/CL8/regs",
            "twopass", "twopass/CL4", "twopass/CL8"} <= kinds
    assert "tokens " in out and "distill " in out


def _addr(a):
    return a.__array_interface__["data"][0]


def _buffer_bounds(a):
    base = a
    while base.base is not None:
        base = base.base
    return _addr(base), _addr(base) + base.nbytes


def test_masked_arrays_have_16_spare_bytes_a_side():
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float64", "float16"):
        vals = rng.standard_normal((5, 7)).astype(dtype)
        for shifted in (False, True):
            a = memcheck._array(np, vals, shifted, tight=False)
            np.testing.assert_array_equal(a, vals)
            lo, hi = _buffer_bounds(a)
            first = _addr(a)
            last = first + (a.shape[0] - 1) * a.strides[0] + a.shape[1] * a.itemsize  # one past the end
            assert first - lo >= 16 and hi - last >= 16
            t = memcheck._array(np, vals, shifted, tight=True)
            lo, hi = _buffer_bounds(t)
            assert hi - (_addr(t) + (t.shape[0] - 1) * t.strides[0] + t.shape[1] * t.itemsize) == 0
    v = memcheck._vector(np, np.arange(9, dtype=np.int64), tight=False)
    lo, hi = _buffer_bounds(v)
    assert _addr(v) - lo == 16 and hi - (_addr(v) + v.nbytes) == 16
