#!/usr/bin/env bash
# The CI leg of the wheels (.ci/run leg 6): build the wheels a user installs and prove each in a
# fresh venv. Steps, each timed:
#   pure    tools/build_wheel.sh --cuda ""        kawhi_kernels-<v>-py3-none-any.whl
#   cuda13  tools/build_wheel.sh --cuda 13         kawhi_kernels_cuda13-<v>-cp3XX-*-manylinux_*.whl
#   cuda12  tools/build_wheel.sh --cuda 12         kawhi_kernels_cuda12-... (CUDA 12.4 toolchain
#                                                  assembled by tools/cuda12_toolchain.sh)
#   check   tools/check_wheels.sh                  fresh venvs, no build tools on PATH: import,
#                                                  `kawhi-kernels info`, torch + Triton-interpreter
#                                                  tests, CUDA host-side tests, SASS arch check
# Everything slow is cached under --cache (~/.cache/kawhi-toolchains), keyed on its inputs: the
# build venv, the CUDA 12.4 toolchain, each native wheel (reused when csrc/, the build files and
# the toolchain hash the same; otherwise only the changed sources are recompiled), and the test
# dependency layer of check_wheels.sh (torch CPU, Triton, transformers, ...; keyed on the
# requirement set). While the native wheels compile, that layer is filled in the background
# (deps, the download/unpack work overlaps the compiles; --no-overlap runs it inside check).
# The venvs of the check are new on every run. An empty cache is a cold run.
#
# Usage: tools/ci_wheels.sh [--python PYTHON] [--out DIR] [--cache DIR] [--archs "80;86;89;90"]
#                           [--jobs N] [--no-overlap]
#   --out    where the wheels go (default: .ci-wheels); its old *.whl are removed first
#   others   as in tools/build_wheel.sh / tools/check_wheels.sh
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
python="python3"
out="$here/.ci-wheels"
cache="${KAWHI_TOOLCHAIN_CACHE:-$HOME/.cache/kawhi-toolchains}"
archs="${KAWHI_CUDA_ARCHS:-80;86;89;90}"
jobs="$(nproc 2>/dev/null || echo 2)"
overlap=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) python="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --cache) cache="$2"; shift 2 ;;
    --archs) archs="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --no-overlap) overlap=0; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "ci_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "ci_wheels.sh: $*" >&2; }
mkdir -p "$out" "$cache"
out="$(cd "$out" && pwd)"
cache="$(cd "$cache" && pwd)"
rm -f "$out"/*.whl
echo '*' >"$out/.gitignore"   # build output: never committed
export KAWHI_TOOLCHAIN_CACHE="$cache"

build=(bash "$here/tools/build_wheel.sh" --python "$python" --out "$out" --archs "$archs"
       --jobs "$jobs" --cache "$cache")
check=(bash "$here/tools/check_wheels.sh" --python "$python" --dist "$out" --archs "$archs"
       --cache "$cache")

names=() secs=()
start=$SECONDS
summary() {
  local i
  echo "== ci_wheels.sh step times (cache $cache):"
  for i in "${!names[@]}"; do printf '==   %-22s %5d s\n' "${names[$i]}" "${secs[$i]}"; done
  printf '==   %-22s %5d s\n' total $((SECONDS - start))
}
finish() {
  local rc=$?
  # a failed step leaves the background dependency job behind: stop it (its own process group)
  if [[ -n "${deps_pid:-}" ]] && kill -0 "$deps_pid" 2>/dev/null; then
    kill -- "-$deps_pid" 2>/dev/null || kill "$deps_pid" 2>/dev/null || true
  fi
  summary
  exit $rc
}
trap finish EXIT

step() {  # NAME COMMAND...: run and time one step; a failing step fails the leg
  local name="$1" t0=$SECONDS rc=0
  shift
  log "---- $name"
  "$@" || rc=$?
  names+=("$name"); secs+=($((SECONDS - t0)))
  log "---- $name: $((SECONDS - t0)) s"
  [[ $rc == 0 ]] || { log "step '$name' FAILED (exit $rc)"; exit "$rc"; }
}

deps_pid=""
deps_log="$out/deps-layer.log"
if [[ $overlap == 1 ]]; then
  deps_t0=$SECONDS
  deps_time="$out/.deps-layer.seconds"
  rm -f "$deps_time"
  # its own session, so that a failed step can stop it and what it started (kill -- -PID)
  setsid bash -c 't0=$SECONDS; "${@:2}"; rc=$?; echo $((SECONDS - t0)) >"$1"; exit $rc' \
    deps "$deps_time" "${check[@]}" --deps-only >"$deps_log" 2>&1 &
  deps_pid=$!
fi

step pure "${build[@]}" --cuda ""
step cuda13 "${build[@]}" --no-pure --cuda 13
step cuda12 "${build[@]}" --no-pure --cuda 12

if [[ -n "$deps_pid" ]]; then
  t0=$SECONDS rc=0
  wait "$deps_pid" || rc=$?
  deps_pid=""
  grep -v "is ignored: it is neither" "$deps_log" >&2 || true
  names+=("deps (background)"); secs+=("$(cat "$deps_time" 2>/dev/null || echo $((SECONDS - deps_t0)))")
  names+=("  waited for it"); secs+=($((SECONDS - t0)))
  rm -f "$deps_time"
  [[ $rc == 0 ]] || { log "the dependency layer FAILED (exit $rc; $deps_log)"; exit "$rc"; }
fi
step check "${check[@]}"

echo "== wheels in $out:"
for whl in "$out"/*.whl; do
  printf '==   %-70s %8d bytes\n' "$(basename "$whl")" "$(stat -c %s "$whl")"
done
