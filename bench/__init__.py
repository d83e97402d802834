"""gpuce benchmarks (run as scripts: python bench/bench_sce_cpu.py)."""
