#!/usr/bin/env bash
# The one-command GPU session: every kernel and every speed claim checked on a lent H100/H200.
#
#   OUT=$OUT KAWHI_GIT_COMMIT=<sha> bash benchmarks/run_gpu.sh          # on the GPU machine
#   BENCH_DEVICE=cpu KAWHI_SKIP_BUILD=1 OUT=/tmp/dry bash benchmarks/run_gpu.sh   # CPU dry run
#
# Phases (run order; each has its own timeout, see `python -m kawhi_kernels.bench.session budget`;
# results are written under $OUT as each phase goes, so a run cut short still returns what it did):
#   build        pip install -e . for sm_90 only (KAWHI_CUDA_ARCHS=90), the carried wheels in
#                benchmarks/wheels/ (pip --no-index: the machine has no package index), info
#   correctness  benchmarks/gpu_checks.py: torch / triton / cuda vs the fp64 reference at
#                Qwen2.5-VL-7B and Qwen3-VL-4B shapes, fp32/bf16/fp16, SDPA-flash lse, determinism
#   plan_gpu     pytest -m gpu (plan.run under sync debug 'error' + CUDA graph, other GPU-only
#                tests), gpu_checks --section plan (CUDA backend, Triton+lse), the Triton sanitizer
#                cases once without the sanitizer (correctness, and it warms Triton's cache)
#   benchmark    kawhi_kernels.bench.cli headline sweeps (DESIGN §7) into $OUT/bench/
#   sanitizer    compute-sanitizer probe, then memcheck + racecheck on the CUDA and Triton cases
# Outputs: $OUT/session.md (GPU, driver, versions, date, commit, command, plan, budget),
# $OUT/phases.{csv,md}, one <phase>.log each, correctness.{csv,md}, plan.{csv,md},
# bench/results.csv + bench/report-*.md, sanitizer/*.log, and SUMMARY.md (all of it in one file).
#
# Knobs: OUT (default benchmarks/results/gpu-session), BENCH_DEVICE (cuda | cpu), KAWHI_GIT_COMMIT
# (the device copy has no .git), KAWHI_SKIP_BUILD=1 (use the extension already built in place),
# TIMEOUT_SCALE (multiplies every phase timeout; default 1 on cuda, 4 on cpu), SESSION_DEADLINE
# (seconds after which no phase starts and running ones are cut; default 570 on cuda),
# PYTHON (default python).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export ROOT
export OUT="${OUT:-$ROOT/benchmarks/results/gpu-session}"
export BENCH_DEVICE="${BENCH_DEVICE:-cuda}"
export PYTHON="${PYTHON:-python}"
export KAWHI_CUDA_ARCHS="${KAWHI_CUDA_ARCHS:-90}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$BENCH_DEVICE" = cpu ]; then
    export TRITON_INTERPRET=1          # Triton kernels run (slowly) in the interpreter on CPU
    TIMEOUT_SCALE="${TIMEOUT_SCALE:-4}"
    SESSION_DEADLINE="${SESSION_DEADLINE:-3000}"
else
    TIMEOUT_SCALE="${TIMEOUT_SCALE:-1}"
    SESSION_DEADLINE="${SESSION_DEADLINE:-570}"
fi
mkdir -p "$OUT"
COMMAND="OUT=$OUT BENCH_DEVICE=$BENCH_DEVICE KAWHI_GIT_COMMIT=${KAWHI_GIT_COMMIT:-unset}${KAWHI_SKIP_BUILD:+ KAWHI_SKIP_BUILD=$KAWHI_SKIP_BUILD} bash benchmarks/run_gpu.sh $*"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[run_gpu +$(elapsed)s] $*"; }

eval "$("$PYTHON" -m kawhi_kernels.bench.session plan --device "$BENCH_DEVICE")" || {
    echo "run_gpu: cannot read the phase plan (python -m kawhi_kernels.bench.session plan)"; exit 2; }
# SWEEP_* are read by the benchmark phase's child shell.
for ((i = 0; i < SWEEPS; i++)); do export "SWEEP_${i}_LABEL" "SWEEP_${i}_ARGS" "SWEEP_${i}_SHARE"; done
export SWEEPS T_benchmark TIMEOUT_SCALE

say "session on $BENCH_DEVICE; outputs in $OUT"
if command -v nvidia-smi > /dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; else echo "nvidia-smi not found" > "$OUT/nvidia-smi.txt"; fi
"$PYTHON" -m kawhi_kernels.bench.session header --out "$OUT" --command "$COMMAND" --device "$BENCH_DEVICE"

# ----------------------------------------------------------------------------- phases

phase_build() {
    if [ "${KAWHI_SKIP_BUILD:-0}" = 1 ]; then
        echo "build skipped (KAWHI_SKIP_BUILD=1): using the extension already in the tree"
    else
        echo "pip install -e . --no-build-isolation --no-deps (KAWHI_CUDA_ARCHS=$KAWHI_CUDA_ARCHS)"
        "$PYTHON" -m pip install -v -e . --no-build-isolation --no-deps || return 1
    fi
    local wheel
    for wheel in "$ROOT"/benchmarks/wheels/*.whl; do
        [ -e "$wheel" ] || continue
        if [ "$BENCH_DEVICE" = cuda ]; then
            echo "installing carried wheel $wheel"
            "$PYTHON" -m pip install --no-index --no-deps "$wheel" || echo "wheel install failed: $wheel"
        else
            echo "CPU dry run: would install carried wheel $wheel (pip --no-index --no-deps)"
        fi
    done
    "$PYTHON" -m kawhi_kernels.cli info | tee "$OUT/info.txt"
}

phase_correctness() {
    "$PYTHON" benchmarks/gpu_checks.py --device "$BENCH_DEVICE" --out "$OUT" --section correctness \
        --time-budget $(( (T_correctness * TIMEOUT_SCALE) - 25 ))
}

phase_plan_gpu() {
    local rc=0
    timeout -k 5 $(( 30 * TIMEOUT_SCALE )) "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rs \
        tests/test_plan.py tests/test_cuda_backend.py tests/test_triton_attention_mass.py \
        tests/test_triton_cosine_alignment.py tests/test_sguf.py tests/test_triton_gpu_hazards.py \
        > "$OUT/plan_gpu-pytest.log" 2>&1 || rc=1
    tail -n 15 "$OUT/plan_gpu-pytest.log"
    "$PYTHON" benchmarks/gpu_checks.py --device "$BENCH_DEVICE" --out "$OUT" --section plan || rc=1
    timeout -k 5 $(( 20 * TIMEOUT_SCALE )) "$PYTHON" benchmarks/sanitizer_triton_cases.py \
        > "$OUT/plan_gpu-triton-cases.log" 2>&1 || rc=1
    tail -n 3 "$OUT/plan_gpu-triton-cases.log"
    return $rc
}

phase_benchmark() {
    local rc=0 i label args share seconds budget
    mkdir -p "$OUT/bench"
    for ((i = 0; i < SWEEPS; i++)); do
        label="SWEEP_${i}_LABEL"; args="SWEEP_${i}_ARGS"; share="SWEEP_${i}_SHARE"
        label="${!label}"; args="${!args}"; share="${!share}"
        seconds=$(awk -v t="$T_benchmark" -v s="$TIMEOUT_SCALE" -v f="$share" 'BEGIN { printf "%d", t * s * f }')
        budget=$(( seconds - 25 > 10 ? seconds - 25 : 10 ))
        echo "sweep $label ($seconds s, case budget $budget s): $args"
        # shellcheck disable=SC2086
        eval "timeout -k 10 $seconds \"\$PYTHON\" -m kawhi_kernels.bench.cli --device \"\$BENCH_DEVICE\" \
            --repeats 5 --warmup 2 --copies 2 --max-case-seconds 3 --time-budget $budget --no-progress \
            --out \"\$OUT/bench\" $args" > "$OUT/bench/sweep-$label.md" 2> "$OUT/bench/sweep-$label.log" || rc=1
        tail -n 3 "$OUT/bench/sweep-$label.log"
    done
    return $rc
}

find_sanitizer() {
    local s
    s="$(command -v compute-sanitizer || true)"
    for d in "${CUDA_HOME:-}" /usr/local/cuda; do
        if [ -z "$s" ] && [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ]; then s="$d/bin/compute-sanitizer"; fi
    done
    [ -n "$s" ] || s="$(ls /opt/nvidia/*/compute-sanitizer/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1 || true)"
    echo "$s"
}

phase_sanitizer() {
    local san rc=0 tool dir="$OUT/sanitizer"
    mkdir -p "$dir"
    san="$(find_sanitizer)"
    [ -n "$san" ] || { echo "REFUSED: compute-sanitizer not found"; return 3; }
    echo "probe: $san --tool memcheck on one tiny torch kernel"
    timeout -k 5 20 "$san" --tool memcheck --error-exitcode 99 "$PYTHON" -c \
        "import torch; x = torch.zeros(4, device='cuda'); x.add_(1); torch.cuda.synchronize(); print('probe ok')" \
        > "$dir/probe.log" 2>&1
    local probe=$?
    tail -n 5 "$dir/probe.log"
    if [ $probe -ne 0 ] || grep -qi "not supported" "$dir/probe.log"; then
        echo "REFUSED: compute-sanitizer probe exit $probe: $(grep -i -m1 -E 'not supported|error' "$dir/probe.log")"
        return 4
    fi
    timeout -k 5 28 bash benchmarks/run_cuda_sanitizer.sh --python "$PYTHON" --log-dir "$dir/cuda" || rc=1
    for tool in memcheck racecheck; do
        timeout -k 5 13 "$san" --tool "$tool" --error-exitcode 99 --print-limit 50 \
            "$PYTHON" benchmarks/sanitizer_triton_cases.py > "$dir/triton-$tool.log" 2>&1
        local r=$?
        echo "triton $tool: exit $r; $(grep -c '^ok ' "$dir/triton-$tool.log") cases ok; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$dir/triton-$tool.log" | tail -n 1)"
        [ $r -eq 0 ] || rc=1
    done
    return $rc
}
export -f phase_build phase_correctness phase_plan_gpu phase_benchmark phase_sanitizer find_sanitizer
export T_correctness

run_phase() {
    local name="$1" skipvar="SKIP_$1" tvar="T_$1"
    local skip="${!skipvar}" t=$(( ${!tvar} * TIMEOUT_SCALE )) left=$(( SESSION_DEADLINE - $(elapsed) ))
    if [ -z "$skip" ] && [ "$left" -lt 15 ]; then skip="skipped: session deadline (${SESSION_DEADLINE}s) reached"; fi
    if [ -n "$skip" ]; then
        say "phase $name: $skip"
        "$PYTHON" -m kawhi_kernels.bench.session record --out "$OUT" --phase "$name" --skip "$skip"
        return
    fi
    [ "$t" -le "$left" ] || t=$left
    say "phase $name (timeout ${t}s)"
    local t0; t0=$(date +%s)
    timeout -k 10 "$t" bash -c "phase_$name" > "$OUT/$name.log" 2>&1
    local rc=$?
    local detail; detail="$(grep -m1 '^REFUSED' "$OUT/$name.log" || tail -n 1 "$OUT/$name.log")"
    tail -n 8 "$OUT/$name.log"
    "$PYTHON" -m kawhi_kernels.bench.session record --out "$OUT" --phase "$name" --rc "$rc" \
        --seconds $(( $(date +%s) - t0 )) --timeout "$t" --detail "${detail:0:300}"
    say "phase $name: exit $rc"
}

for phase in build correctness plan_gpu benchmark sanitizer; do
    run_phase "$phase"
done

{
    cat "$OUT/session.md"
    echo "## Phases"; echo; cat "$OUT/phases.md"; echo
    for f in correctness.md plan.md; do [ -f "$OUT/$f" ] && { cat "$OUT/$f"; echo; }; done
    for f in "$OUT"/bench/report-*.md; do [ -f "$f" ] && { cat "$f"; echo; }; done
    [ -d "$OUT/sanitizer" ] && { echo "## Sanitizer"; echo; grep -h -E "SUMMARY|REFUSED|mismatches|probe" "$OUT"/sanitizer/*.log "$OUT"/sanitizer/*/*.log "$OUT/sanitizer.log" 2>/dev/null | sed 's/^/    /'; }
} > "$OUT/SUMMARY.md"
cat "$OUT/phases.md"
say "done; $OUT/SUMMARY.md"
