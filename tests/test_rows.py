"""The rules every path shares, each written once (gpuce._rows, SceArgs.mean_scale), and that
the paths use them rather than their own copies."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from gpuce._rows import check_labels, mean_denominator, sum_squares
from gpuce._validation import sce_args

ROOT = Path(__file__).resolve().parent.parent


def _args(target, c=4, reduction="mean", **kw):
    return sce_args(np.zeros(np.shape(target)[:1] + (c,), np.float32), np.asarray(target),
                    reduction=reduction, ignore_index=kw.pop("ignore_index", -100),
                    weight=kw.pop("weight", None), label_smoothing=0.0, z_loss=0.0,
                    return_grad=False, inplace=False, **kw)


def test_mean_scale():
    assert _args([0, 1], reduction="mean").mean_scale(4.0) == 0.25
    assert _args([0, 1], reduction="mean").mean_scale(0.0) == 0.0  # the zero-denominator rule
    assert _args([0, 1], reduction="sum").mean_scale(0.0) == 1.0
    assert _args([0, 1], reduction="none").mean_scale(4.0) == 1.0


def test_mean_denominator():
    y = np.array([0, 3, -100, 9, 2])  # 9 is out of range: counted as ignored here
    w = np.array([1.0, 2.0, 3.0, 4.0])
    assert mean_denominator(np, y, None, _args(y)) == 3.0
    assert mean_denominator(np, y, w, _args(y)) == 1.0 + 4.0 + 3.0
    p = np.full((5, 4), 0.25)
    assert mean_denominator(np, p, None, _args(p)) == 5.0


def test_check_labels_names_the_first_bad_position():
    y = np.array([0, 3, -100, 9, 2])
    with pytest.raises(ValueError, match=r"label 9 at position \(3,\)"):
        check_labels(np, y, _args(y))
    check_labels(np, np.array([0, -100, 3]), _args([0, -100, 3]))


def test_sum_squares():
    W = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert sum_squares(np, W) == np.float32(55.0)


def test_no_private_copies_of_the_rules():
    """The mean's scale is written once (SceArgs.mean_scale) in the modules this project
    shares; the backends and the dask paths call it."""
    for name in ("sce.py", "linear.py", "_dask.py", "_sce_numpy.py"):
        text = (ROOT / "gpuce" / name).read_text(encoding="utf-8")
        assert not re.search(r"1\.0 / denom", text), name
