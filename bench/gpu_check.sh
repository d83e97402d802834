#!/usr/bin/env bash
# The one prepared script for a GPU machine (run from the repo root of a checkout there):
#   GPU test suite -> probe -> demo -> benchmark suite -> ncu -> linear and large-vocabulary
#   benchmarks; logs, CSVs and plots in the folder $OUT, a short table last.  On the
#   development checkout, with that folder copied back as gpu_out/, record the run with
#   `gpuce bench --merge gpu_out/gpu_sce.csv --readme README.md` (upserts into
#   bench/results/gpu_sce.csv, redraws the plot and the README table), copy probe.csv to
#   bench/results/probe.csv, and write prediction and outcome into docs/performance.md
#   (CONTRIBUTING.md, "On a GPU machine").
# Usage on the GPU machine:  bash bench/gpu_check.sh
#   OUT        where logs go (default ./gpu_out)
#   PARTS      which steps, default "tests probe" (the suite alone may need two calls: see
#              GPUCE_TEST_SHARD); then "bench" (about 8:
#              the sweep at 2^30 with every provider, 2^28 for the fixed/marginal split, small C,
#              the softcap row); then "variants" (every fused variant pinned at 2^28, about 2.5
#              minutes, then C >= 4096 again with the release/acquire cluster exchange,
#              GPUCE_XCHG_ORDERED=1, about 2 more: its own call), "ncu lce linear demo", "tokens", "distill", "distill_logits" and "memcheck" (each alone in its
#              call: TOKENS_ARGS, DISTILL_ARGS, DISTILL_LOGITS_ARGS below).  A device call is limited to 10 minutes: one
#              call a line, each with its own timeout_s.  PARTS="" (set, empty) runs nothing
#              but the wheel install; only an unset PARTS means the default.
#   BENCH_ARGS narrows the sweep, e.g. BENCH_ARGS="--totals 2**28 --dtypes float32 --repeat 5";
#              add --variants to time every fused variant that fits each shape (fused[...] rows:
#              how the chooser's order is set, e.g. the label-a-row-ahead forms against the rest)
#   PYTEST_ARGS default "-n 8 --timeout 120" (pytest-xdist and pytest-timeout are on the image)
#   TESTS      test paths, default "tests" (e.g. TESTS="tests/test_linear_chunked.py tests/test_torch.py"
#              to run only the GPU tests of what changed since the last GPU run)
#   GPUCE_TEST_SHARD  "i/k": the i-th of k fixed shares of the tests (tests/conftest.py). The GPU
#              suite is about 2600 tests (with every variant's first NVRTC compile): run part
#              "tests" as two device calls, GPUCE_TEST_SHARD=1/2 then 2/2 (with "probe" in the
#              second), T_TESTS each; a share that still times out: 1/4 .. 4/4
#   LCE_ARGS   arguments of bench/bench_lce.py (large-vocabulary linear CE: CCE's shape, an LLM
#              head, the trainer shapes, three dtypes, a chunk sweep; e.g. LCE_ARGS="--shapes cce")
#   TOKENS_ARGS arguments of bench/bench_tokens.py (part "tokens": token log-probabilities and
#              entropy from hidden states, log p + H forward and forward+backward, gpuce against the
#              materialised torch reference, torch.compile and Liger; bf16 N = 4096 and 8192, D = 4096,
#              V = 128256 and 151936, then fp32 at N = 4096; predicted 5-7 minutes, not yet run;
#              one device call of its own; rows into $OUT/tokens_gpu.csv after every point, the
#              plot $OUT/tokens_gpu.png; e.g. TOKENS_ARGS="--dtypes bfloat16" or
#              "--shape 8192 4096 151936 --modes fwd+bwd"); record it with
#              `cp gpu_out/tokens_gpu.csv bench/results/`
#   DISTILL_ARGS arguments of bench/bench_distill.py (part "distill": the linear distillation step,
#              forward KL (beta 0) and generalised JSD (beta 0.5), forward + backward, gpuce against the
#              GEMMs alone, the materialised torch reference, torch.compile, gpuce.torch and Liger where
#              present; bf16 N = 8192, D = 4096, V = 128256 and 151936; not yet run; one device call
#              of its own; rows into $OUT/distill_gpu.csv after every point, the plot
#              $OUT/distill_gpu.png; e.g. DISTILL_ARGS="--betas 0" or "--shape 8192 4096 151936");
#              record it with `cp gpu_out/distill_gpu.csv bench/results/`
#   DISTILL_LOGITS_ARGS arguments of bench/bench_distill_logits.py (part "distill_logits": the
#              dense-logits distillation loss, forward + backward w.r.t. the student's (N, V) logits,
#              beta 0 and 0.5, gpuce and gpuce.torch against the eager torch reference, torch.compile
#              and Liger's LigerJSD / LigerKLDIVLoss where present and computing the same quantity;
#              N = 8192, V = 32768, 65536, 131072, bf16 then fp32, each against a timed copy of the
#              student's logits; not yet run; one device call of its own (12 torch.compile compiles:
#              if T_DISTILL_LOGITS cuts it off, run DISTILL_LOGITS_ARGS="--dtypes float32" in a second
#              call); rows into $OUT/distill_logits_gpu.csv after every point); record it with
#              `cp gpu_out/distill_logits_gpu.csv bench/results/`
#   memcheck   part "memcheck": every fused kernel under compute-sanitizer (bench/memcheck.py), first on
#              arrays with 16 spare bytes a side (any report fails it), then on exact-size arrays
#              (the edge granules' reads past the end expected: counted); RACECHECK=1 adds racecheck.
#              Firecracker machines only (gVisor's compute-sanitizer refuses the device).
#              One device call of its own, after part "tests" (its compiled kernels are cached)
#   T_TESTS T_DEMO T_BENCH T_LINEAR T_LCE T_TOKENS T_DISTILL T_DISTILL_LOGITS  seconds each step may take (so one slow step cannot eat a
#              whole device call; the benchmark upserts its CSV after every point)
# Liger-Kernel and Cut Cross-Entropy are not on the device image: to compare with them,
# download their wheels here first (pure Python; --python-version etc. as the image's 3.12)
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel cut-cross-entropy
# and name .whl in the device call's carry; this script installs what it finds there.
set -uo pipefail
OUT=${OUT:-gpu_out}
PARTS=${PARTS-tests probe}  # unset: the default; set and empty: nothing (the wheels only)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # no install: hatchling is not there, nothing can be fetched
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import cupy, gpuce; print('cupy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())"
rc=0
has() { [[ " $PARTS " == *" $1 "* ]]; }
if has tests; then
  timeout "${T_TESTS:-420}" python3 -m pytest -q -m gpu -p no:cacheprovider ${PYTEST_ARGS:--n 8 --timeout 120} \
    ${TESTS:-tests} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  rc=${PIPESTATUS[0]}
  [[ $rc == 124 ]] && echo "part tests: cut off at T_TESTS=${T_TESTS:-420} s: split it (GPUCE_TEST_SHARD=1/2, 2/2)"
fi
if has probe; then  # the fused path's costs, one table (bench/probe.py)
  timeout "${T_PROBE:-90}" python3 bench/probe.py --out "$OUT" 2>&1 | tee "$OUT/probe.log" | tail -30
fi
if has demo; then
  timeout "${T_DEMO:-60}" python3 -m gpuce.cli demo --backend cupy --png /tmp/demo-loss.png 2>&1 | tee "$OUT/demo.log"
fi
if has bench; then
  timeout "${T_BENCH:-240}" python3 -m bench --no-progress --results-dir "$OUT" ${BENCH_ARGS:---totals 2**30 --classes 1000 4096 32768 131072 262144 --dtypes float32 float16 bfloat16 --repeat 10} 2>&1 | tee "$OUT/bench.log"
  # the smaller size of the fixed/marginal split (no torch.compile: one compile a shape)
  timeout "${T_BENCH_SPLIT:-90}" python3 -m bench --no-progress --results-dir "$OUT" --totals 2**28 --classes 1000 4096 32768 131072 262144 \
    --dtypes float32 float16 --providers gpuce-fused gpuce-portable torch-eager liger --repeat 10 2>&1 | tee -a "$OUT/bench.log"
  # the small-C target is stated at N = 2^24 rows (same CSV, its own rows)
  timeout "${T_BENCH_SMALL:-60}" python3 -m bench --no-progress --results-dir "$OUT" --rows 2**24 --classes 10 100 \
    --dtypes float32 --providers gpuce-fused gpuce-portable torch-eager --repeat 10 2>&1 | tee -a "$OUT/bench.log"
  # Gemma's head: C = 256000, logits capped at 30 tanh(f / 30), bf16, against Liger with the same option
  timeout "${T_BENCH_SOFTCAP:-90}" python3 -m bench --no-progress --results-dir "$OUT" --totals 2**30 --classes 256000 \
    --dtypes bfloat16 --softcap 30 --repeat 10 2>&1 | tee -a "$OUT/bench.log"
fi
if has variants; then  # every fused variant that fits each shape, pinned (the planner's order comes from these)
  timeout "${T_VARIANTS:-150}" python3 -m bench --no-progress --results-dir "$OUT/variants" --repeat 5 --totals 2**28 \
    --classes 10 100 1000 4096 32768 131072 262144 --dtypes float32 bfloat16 --providers gpuce-fused --variants \
    2>&1 | tee "$OUT/variants.log" | grep -E "N=" | tr ',' '\n' | grep -E "N=|fused"
  # the cluster kernels again with the release/acquire exchange (GPUCE_XCHG_ORDERED, see
  # kernels/gpuce_team.cuh): adopted only if these rows match the ones above
  GPUCE_XCHG_ORDERED=1 timeout "${T_VARIANTS:-150}" python3 -m bench --no-progress --results-dir "$OUT/variants_ordered" \
    --repeat 5 --totals 2**28 --classes 4096 32768 131072 262144 --dtypes float32 bfloat16 --providers gpuce-fused \
    --variants 2>&1 | tee "$OUT/variants_ordered.log" | grep -E "N=" | tr ',' '\n' | grep -E "N=|fused\[cluster|fused\[twopass"
fi
if has ncu; then  # hardware counters of one fused launch (Firecracker machines: ncu works there)
  timeout "${T_NCU:-120}" ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats -k regex:sce_ --launch-count 2 python3 -c "
import cupy as cp, gpuce
x = cp.random.standard_normal((2**28 // 4096, 4096), dtype=cp.float32); y = cp.random.randint(0, 4096, x.shape[0])
gpuce.softmax_cross_entropy(x, y, return_grad=True); cp.cuda.Device().synchronize()
" > "$OUT/ncu.log" 2>&1; tail -40 "$OUT/ncu.log"
  # the large-row candidates side by side: float32 C = 131072, the planner's cluster kernel,
  # twopass and twopass over clusters of 4 and 8 (sce_twopass_cluster), one launch each
  timeout "${T_NCU:-120}" ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy -k regex:sce_ python3 -c "
import cupy as cp
from gpuce._cuda import fused, sce
from gpuce._validation import sce_args
x = cp.random.standard_normal((2**28 // 131072, 131072), dtype=cp.float32); y = cp.random.randint(0, 131072, x.shape[0])
args = sce_args(x, y, reduction='sum', ignore_index=-100, weight=None, label_smoothing=0.0, z_loss=0.0, return_grad=True, inplace=False)
g = cp.empty_like(x)
for p in fused.candidates_for(x, 'label', y.dtype.name, None, g)[0]:
    print(p.describe()); sce.softmax_cross_entropy(x, y, None, args, g, 'fused', p.variant)
cp.cuda.Device().synchronize()
" > "$OUT/ncu_large.log" 2>&1; tail -60 "$OUT/ncu_large.log"
fi
if has memcheck; then  # every fused kernel under compute-sanitizer (bench/memcheck.py; Firecracker machines)
  # masked arrays (16 spare bytes a side, pool off): any report is a real out-of-bounds access
  timeout "${T_MEMCHECK:-300}" compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    python3 bench/memcheck.py > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?"; tail -25 "$OUT/memcheck.log"
  # the same kernels on exact-size arrays: the edge granules' reads past an array's end are
  # expected here (counted for the record, not a failure)
  timeout "${T_MEMCHECK:-300}" compute-sanitizer --tool memcheck --print-limit 1000 \
    python3 bench/memcheck.py --tight > "$OUT/memcheck_tight.log" 2>&1
  echo "memcheck --tight: $(grep -c 'Invalid __global__ read of size 16' "$OUT/memcheck_tight.log") reads of" \
    "16 bytes past an allocation, $(grep -c 'Invalid __global__ write' "$OUT/memcheck_tight.log") invalid writes"
  if [[ -n "${RACECHECK:-}" ]]; then  # shared-memory races (slow: opt in with RACECHECK=1)
    timeout "${T_MEMCHECK:-300}" compute-sanitizer --tool racecheck --error-exitcode 9 python3 bench/memcheck.py \
      > "$OUT/racecheck.log" 2>&1
    echo "racecheck rc=$?"; tail -15 "$OUT/racecheck.log"
  fi
fi
if has linear; then
  timeout "${T_LINEAR:-60}" python3 bench/bench_linear.py --gpu 2>&1 | tee /tmp/bench_linear.log
  cp bench/results/linear.csv "$OUT/linear.csv" 2>/dev/null
fi
if has tokens; then  # token log p + entropy, linear form (bench/bench_tokens.py); T_TOKENS < a device call
  timeout "${T_TOKENS:-450}" python3 bench/bench_tokens.py --csv "$OUT/tokens_gpu.csv" --png "$OUT/tokens_gpu.png" \
    ${TOKENS_ARGS:-} 2>&1 | tee "$OUT/tokens.log"
fi
if has distill; then  # the linear distillation step (bench/bench_distill.py); T_DISTILL < a device call
  timeout "${T_DISTILL:-450}" python3 bench/bench_distill.py --csv "$OUT/distill_gpu.csv" --png "$OUT/distill_gpu.png" \
    ${DISTILL_ARGS:-} 2>&1 | tee "$OUT/distill.log"
fi
if has distill_logits; then  # the dense-logits distillation step (bench/bench_distill_logits.py); < a device call
  timeout "${T_DISTILL_LOGITS:-480}" python3 bench/bench_distill_logits.py --csv "$OUT/distill_logits_gpu.csv" \
    ${DISTILL_LOGITS_ARGS:-} 2>&1 | tee "$OUT/distill_logits.log"
fi
if has lce; then
  timeout "${T_LCE:-420}" python3 bench/bench_lce.py ${LCE_ARGS:-} 2>&1 | tee /tmp/bench_lce.log
  cp bench/results/lce.csv "$OUT/lce.csv" 2>/dev/null
  cp bench/results/lce.png "$OUT/lce.png" 2>/dev/null
fi
echo "=== summary ($PARTS) ==="
has tests && tail -1 "$OUT/gpu_tests.log"
has probe && grep -E "^\|" "$OUT/probe.log" | tail -40
has probe && sed -n 1,22p "$OUT/host_profile.txt" 2>/dev/null | cut -c1-150  # where a call's host time goes
has demo && grep -E "check:|accuracy|backend" "$OUT/demo.log"
has bench && grep -E "^\|" "$OUT/bench.log" | tail -12
has linear && grep -E "ratio" /tmp/bench_linear.log
has lce && grep -E "^\||^N=" /tmp/bench_lce.log
has tokens && grep -E "^\||^N=" "$OUT/tokens.log"
has distill && grep -E "^\||^N=" "$OUT/distill.log"
has distill_logits && grep -E "^\||^N=" "$OUT/distill_logits.log"
exit $rc
