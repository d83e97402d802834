"""Shared by the bench scripts: the tidy CSV of gpuce.benchmark, written under bench/results."""

from __future__ import annotations

from pathlib import Path

from gpuce.benchmark import cpu_name, upsert as _upsert

RESULTS = Path(__file__).resolve().parent / "results"


def machine_name() -> str:
    return cpu_name()


def upsert(csv_name: str, rows: list[dict]) -> Path:
    """Insert or replace ``rows`` in bench/results/<csv_name> (keyed like every gpuce CSV)."""
    return _upsert(RESULTS / csv_name, rows)
