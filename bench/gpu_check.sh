#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (run from the repo root):
#   GPU test suite -> demo -> GPU benchmark, logs and CSV under $OUT, short table last.
# Usage on the device:  bash bench/gpu_check.sh            (OUT defaults to ./gpu_out)
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # no install: hatchling is not there, nothing can be fetched
python3 -c "import cupy, gpuce; print('cupy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())"
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}
python3 -m gpuce.cli demo --backend cupy --png "$OUT/demo-loss.png" 2>&1 | tee "$OUT/demo.log"
python3 bench/bench_sce_gpu.py ${BENCH_ARGS:-} --out "$OUT/gpu_sce.csv" 2>&1 | tee "$OUT/bench.log"
python3 bench/bench_linear.py --gpu ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_linear.log"
cp bench/results/*.csv "$OUT/" 2>/dev/null
echo "=== summary ==="
tail -1 "$OUT/gpu_tests.log"
grep -E "check:" "$OUT/demo.log"
grep -E "copy|gpuce|torch|naive" "$OUT/bench.log" | tail -30
grep -E "ratio" "$OUT/bench_linear.log"
exit $tests_rc
