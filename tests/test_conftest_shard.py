"""GPUCE_TEST_SHARD (tests/conftest.py): k shares that partition the tests, the same on every run."""

import zlib
from types import SimpleNamespace

import pytest

import conftest


class _Config:
    def __init__(self):
        self.deselected = []
        self.hook = SimpleNamespace(pytest_deselected=lambda items: self.deselected.extend(items))


def _items(n):
    return [SimpleNamespace(nodeid=f"tests/test_x.py::test_{i}[p{i % 7}]") for i in range(n)]


def test_shards_partition_the_tests(monkeypatch):
    items = _items(500)
    kept = []
    for i in (1, 2, 3):
        monkeypatch.setenv("GPUCE_TEST_SHARD", f"{i}/3")
        cfg = _Config()
        keep = conftest._shard(list(items), cfg)
        assert len(keep) + len(cfg.deselected) == 500 and 100 < len(keep) < 240
        assert all(zlib.crc32(it.nodeid.encode()) % 3 == i - 1 for it in keep)
        kept += keep
    assert sorted(id(it) for it in kept) == sorted(id(it) for it in items)  # each test in one share


def test_no_shard_keeps_everything_and_bad_specs_raise(monkeypatch):
    items = _items(10)
    monkeypatch.delenv("GPUCE_TEST_SHARD", raising=False)
    assert conftest._shard(items, _Config()) is items
    for bad in ("2", "a/b", "0/2", "3/2"):
        monkeypatch.setenv("GPUCE_TEST_SHARD", bad)
        with pytest.raises(pytest.UsageError):
            conftest._shard(items, _Config())
