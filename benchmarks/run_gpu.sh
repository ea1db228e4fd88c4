#!/usr/bin/env bash
# One-shot GPU session: build the package, run the whole test suite, run the full benchmark sweep.
#
#   bash benchmarks/run_gpu.sh            # on the GPU machine, from anywhere
#
# Everything lands in $OUT (default: benchmarks/results/gpu-session): build.log, pytest.log,
# info.txt, nvidia-smi.txt, sweep.log and a copy of the sweep outputs (results.csv,
# report-<run_id>.md, time/memory PNGs). The sweep itself appends to benchmarks/results/results.csv.
# The markdown table is printed to stdout at the end. The whole script is budgeted to finish in
# about TOTAL_BUDGET seconds (default 540): each phase has a timeout, and the sweep gets what is
# left (its remaining cases are recorded as "skipped: time budget", never silently dropped).
#
# Knobs (environment): TOTAL_BUDGET, BUILD_TIMEOUT (180), TEST_TIMEOUT (200), BENCH_ARGS (extra
# arguments for the sweep, e.g. "--ops attention_mass"), KAWHI_CUDA_ARCHS (default "90": H100/H200),
# KAWHI_GIT_COMMIT (recorded in the CSV; the device copy of the tree has no .git), BENCH_DEVICE
# (default cuda; "cpu" together with BENCH_ARGS="--quick" dry-runs this script without a GPU).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/results/gpu-session}"
mkdir -p "$OUT"
TOTAL_BUDGET="${TOTAL_BUDGET:-540}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-180}"
TEST_TIMEOUT="${TEST_TIMEOUT:-200}"
export KAWHI_CUDA_ARCHS="${KAWHI_CUDA_ARCHS:-90}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[run_gpu +$(elapsed)s] $*"; }

say "machine"
if command -v nvidia-smi > /dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; else echo "nvidia-smi not found" > "$OUT/nvidia-smi.txt"; fi
head -n 15 "$OUT/nvidia-smi.txt"
python --version

say "build: pip install -e . --no-build-isolation --no-deps (timeout ${BUILD_TIMEOUT}s, archs $KAWHI_CUDA_ARCHS)"
timeout -k 10 "$BUILD_TIMEOUT" python -m pip install -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1
BUILD_RC=$?
tail -n 5 "$OUT/build.log"
say "build exit status $BUILD_RC"

python -m kawhi_kernels.cli info > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"

say "tests: python -m pytest -q tests -m 'gpu or not gpu' (timeout ${TEST_TIMEOUT}s)"
timeout -k 10 "$TEST_TIMEOUT" python -m pytest -q tests -m "gpu or not gpu" -p no:cacheprovider --durations=15 > "$OUT/pytest.log" 2>&1
TEST_RC=$?
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -n 40
tail -n 3 "$OUT/pytest.log"
say "tests exit status $TEST_RC"

SWEEP_BUDGET=$(( TOTAL_BUDGET - $(elapsed) - 45 ))
if [ "$SWEEP_BUDGET" -lt 60 ]; then SWEEP_BUDGET=60; fi
BENCH_DEVICE="${BENCH_DEVICE:-cuda}"
say "sweep: ${BENCH_ARGS:-full shapes} on $BENCH_DEVICE, time budget ${SWEEP_BUDGET}s"
# shellcheck disable=SC2086
timeout -k 15 $(( SWEEP_BUDGET + 30 )) python -m kawhi_kernels.bench.cli --device "$BENCH_DEVICE" --repeats 5 --warmup 2 \
    --copies 3 --max-case-seconds 3 --time-budget "$SWEEP_BUDGET" --no-progress \
    --out "$ROOT/benchmarks/results" ${BENCH_ARGS:-} > "$OUT/sweep.md" 2> "$OUT/sweep.log"
SWEEP_RC=$?
tail -n 5 "$OUT/sweep.log"
say "sweep exit status $SWEEP_RC"

cp "$ROOT/benchmarks/results/results.csv" "$OUT/" 2>/dev/null
RUN_ID=$(grep -m1 -o 'report-[^ ;]*\.md' "$OUT/sweep.log" | sed 's/^report-//; s/\.md$//')
if [ -n "$RUN_ID" ]; then
    cp "$ROOT/benchmarks/results/"*"$RUN_ID"* "$OUT/" 2>/dev/null
fi
cat "$OUT/sweep.md"
say "done: build=$BUILD_RC tests=$TEST_RC sweep=$SWEEP_RC; outputs in $OUT"
