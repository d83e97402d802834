#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (run from the repo root):
#   GPU test suite -> demo -> benchmark suite -> linear benchmark; logs, CSVs and plots under
#   $OUT (8 files at most come back), a short table last.  Back here, record the run with
#   `gpuce bench --merge <files_at>/gpu_sce.csv --readme README.md` (upserts into
#   bench/results/gpu_sce.csv, redraws the plot and the README table).
# Usage on the device:  bash bench/gpu_check.sh   (OUT defaults to ./gpu_out; BENCH_ARGS narrows
#   the sweep, e.g. BENCH_ARGS="--totals 2**28 --dtypes float32 --repeat 5")
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # no install: hatchling is not there, nothing can be fetched
python3 -c "import cupy, gpuce; print('cupy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())"
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}
python3 -m gpuce.cli demo --backend cupy --png "$OUT/demo-loss.png" 2>&1 | tee "$OUT/demo.log"
python3 -m bench --no-progress --results-dir "$OUT" ${BENCH_ARGS:---repeat 10} 2>&1 | tee "$OUT/bench.log"
python3 bench/bench_linear.py --gpu 2>&1 | tee "$OUT/bench_linear.log"
cp bench/results/linear.csv "$OUT/linear.csv" 2>/dev/null
echo "=== summary ==="
tail -1 "$OUT/gpu_tests.log"
grep -E "check:" "$OUT/demo.log"
grep -E "^\|" "$OUT/bench.log" | tail -12
grep -E "ratio" "$OUT/bench_linear.log"
exit $tests_rc
