"""Tidy benchmark CSV: one row per (op, provider, mode, dtype, N, C, machine), upserted."""

from __future__ import annotations

import csv
import datetime as _dt
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KEY = ("op", "provider", "mode", "dtype", "N", "C", "machine")
FIELDS = KEY + ("p20_ms", "p50_ms", "p80_ms", "gbps", "frac_of_copy", "note", "timestamp", "version")


def machine_name() -> str:
    return f"cpu:{platform.processor() or platform.machine()}:{_nproc()}cores"


def _nproc() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def upsert(csv_name: str, rows: list[dict]) -> Path:
    """Insert or replace ``rows`` (keyed by KEY) in bench/results/<csv_name>."""
    import gpuce

    path = RESULTS / csv_name
    RESULTS.mkdir(parents=True, exist_ok=True)
    existing = {}
    if path.exists():
        with path.open() as f:
            for r in csv.DictReader(f):
                existing[tuple(r[k] for k in KEY)] = r
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for r in rows:
        r = {k: ("" if r.get(k) is None else str(r.get(k))) for k in FIELDS}
        r["timestamp"] = r["timestamp"] or stamp
        r["version"] = r["version"] or gpuce.__version__
        existing[tuple(r[k] for k in KEY)] = r
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for k in sorted(existing):
            w.writerow(existing[k])
    return path
