"""CPU backend: softmax_cross_entropy (loss + grad) against one read+write copy of the logits.

Goal: <= 2.0x a copy for C >= 1000.  The sweep is gpuce.benchmark.cpu_sweep (the
same code ``gpuce bench --dry`` checks); rows go to bench/results/cpu_sce.csv and the table
printed is drawn from that CSV.

    python bench/bench_sce_cpu.py [--elements 2**23] [--repeat 9]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpuce import benchmark as B

CSV = Path(__file__).resolve().parent / "results" / "cpu_sce.csv"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--elements", type=B.parse_count, default=2**23, help="N*C, e.g. 2**23")
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000, 4096, 32768])
    p.add_argument("--readme", type=Path, default=None, help="regenerate this README's CPU table")
    a = p.parse_args(argv)
    rows, name = B.cpu_sweep(a.classes, [a.elements], ["float32"], a.repeat)
    B.upsert(CSV, rows)
    text = B.table(B.read_rows(CSV), name, "float32")
    print(text)
    print("csv:", CSV)
    if a.readme:
        print("README table updated" if B.update_readme(a.readme, text, "cpu-bench") else
              "README has no cpu-bench section")


if __name__ == "__main__":
    main()
