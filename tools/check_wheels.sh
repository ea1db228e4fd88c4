#!/usr/bin/env bash
# Prove the built wheels install and work for a user: for each native companion wheel in DIST
# (kawhi_kernels_cuda*.whl), make a fresh venv, install `kawhi-kernels[cudaNN]` from DIST (the
# pure wheel plus that companion, resolved through the extra), then with no build tools on PATH
# (no nvcc, cmake, ninja, cc/c++/gcc/g++, CUDA_HOME unset) run: the import, `kawhi-kernels info`
# (it must name the companion as the loaded native build), the SASS/dependency check on the
# installed module and the CUDA host-side tests, from a copy of tests/ outside the source tree (so
# the tree's kawhi_kernels is not what gets imported). The first venv checks the pure wheel alone
# first (no native module; info says none is installed; the torch and Triton-interpreter tests)
# and then adds its companion. On a machine with a GPU the GPU tests of
# tests/test_cuda_*.py run too (they are marked gpu and skip without one).
#
# The heavy third-party requirements (torch CPU, Triton, transformers, scipy, scikit-image, ...)
# are installed once into a cached dependency layer, $CACHE/deps-<python>-<key>/site (pip
# --target; the key hashes the requirement list, the Python and the pip constraints), which each
# fresh venv reaches through one .pth file. The venvs themselves are new every run: pip must
# resolve kawhi-kernels[cudaNN]'s requirements against what it sees there (it would fail, not
# download, with --no-index), and the check fails unless the only distributions pip put into the
# venv are kawhi-kernels and the companion (nothing of the layer replaced or shadowed).
#
# Usage: tools/check_wheels.sh [--dist DIR] [--python PYTHON] [--archs "80;86;89;90"]
#                              [--torch SPEC] [--work DIR] [--keep] [--cache DIR] [--deps-only]
#                              [--parallel N]
#   --dist       where tools/build_wheel.sh wrote the wheels (default: dist/)
#   --python     interpreter for the venvs (its tag must match the native wheels; default python3)
#   --torch      torch requirement (default: torch==2.13.0)
#   --work       where the venvs go (default: a temporary dir, removed unless --keep)
#   --cache      where the dependency layer lives (default: $KAWHI_TOOLCHAIN_CACHE, else
#                ~/.cache/kawhi-toolchains)
#   --deps-only  only make sure the dependency layer exists (tools/ci_wheels.sh runs this in the
#                background while the native wheels compile), then exit
#   --parallel   how many venvs are checked at once (default: the number of CPUs; 1: in turn)
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
dist="$here/dist"
python="python3"
archs="${KAWHI_CUDA_ARCHS:-80;86;89;90}"
torch_spec="torch==2.13.0"
work=""
keep=0
cache="${KAWHI_TOOLCHAIN_CACHE:-$HOME/.cache/kawhi-toolchains}"
deps_only=0
parallel="$(nproc 2>/dev/null || echo 1)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dist) dist="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --archs) archs="$2"; shift 2 ;;
    --torch) torch_spec="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --cache) cache="$2"; shift 2 ;;
    --deps-only) deps_only=1; shift ;;
    --parallel) parallel="$2"; shift 2 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "check_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "check_wheels.sh: $*" >&2; }
[[ "$parallel" =~ ^[1-9][0-9]*$ ]] || { log "--parallel: '$parallel' is not a positive integer"; exit 2; }

quiet_pip() {  # pip's warnings about absent local index folders are noise here
  "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# ---------------------------------------------------------------- the dependency layer (cached)
# What the tests need besides kawhi-kernels itself: the package's runtime requirements and the
# test tools (the test extra's build tools pybind11/cmake are left out: the venvs get none).
# pip is there too: the venvs are made --without-pip and install the wheels with the layer's pip
# (no ensurepip per venv, and no setuptools in the venv: it is a build tool, and an old one
# would shadow the layer's, which torch requires).
requirements=("$torch_spec" "triton>=3.6,<3.10" "transformers>=5.5.3,!=5.6.0" numpy tqdm pillow
              matplotlib pytest scipy scikit-image "nvidia-cuda-cuobjdump>=13,<14" "pip>=23")
pyver="$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
deps_key="$( { printf '%s\n' "${requirements[@]}"; "$python" -VV; "$python" -m pip --version | cut -d' ' -f1-2
               cat /etc/xdg/pip/constraints.txt /etc/pip.conf 2>/dev/null || true; } | sha256sum | cut -c1-16)"
deps="$cache/deps-$pyver-$deps_key"

ensure_deps_layer() {
  [[ -f "$deps/.complete" ]] && return 0
  mkdir -p "$cache"
  exec 9>"$cache/.deps-$pyver.lock"
  flock 9                                     # another run may be filling the same layer
  if [[ -f "$deps/.complete" ]]; then exec 9>&-; return 0; fi
  local t0=$SECONDS partial="$deps.partial"
  log "dependency layer $deps: pip install --target (once per requirement set)"
  rm -rf "$partial"
  # --target ignores what the interpreter has installed; its conflict report about that
  # unrelated environment is noise.
  PIP_ROOT_USER_ACTION=ignore quiet_pip "$python" -m pip install -q --no-warn-script-location \
    --no-warn-conflicts --target "$partial/site" "${requirements[@]}" >&2
  printf '%s\n' "${requirements[@]}" >"$partial/requirements.txt"
  touch "$partial/.complete"
  rm -rf "$deps" && mv "$partial" "$deps"
  # Older layers (another requirement set) are not reused: drop them.
  find "$cache" -maxdepth 1 -name "deps-$pyver-*" ! -name "$(basename "$deps")" -exec rm -rf {} +
  exec 9>&-
  log "dependency layer ready in $((SECONDS - t0)) s"
}
ensure_deps_layer
[[ $deps_only == 1 ]] && { log "dependency layer: $deps"; exit 0; }

dist="$(cd "$dist" && pwd)"
version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$here/kawhi_kernels/__init__.py")"
compgen -G "$dist/kawhi_kernels-$version-py3-none-any.whl" >/dev/null \
  || { log "no kawhi_kernels-$version-py3-none-any.whl in $dist (tools/build_wheel.sh)"; exit 1; }
if [[ -z "$work" ]]; then
  work="$(mktemp -d /tmp/kawhi-check-wheels.XXXXXX)"
  [[ $keep == 1 ]] || trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"

# A PATH without build tools: every command of /usr/bin and /bin except compilers and builders.
tools="$work/path"
rm -rf "$tools" && mkdir -p "$tools"
hidden='^(nvcc|cmake|ctest|cpack|ninja|make|cc|c\+\+|gcc|g\+\+|cpp|ld|ld\.bfd|ld\.gold|clang.*|x86_64-linux-gnu-.*|gcc-[0-9]+|g\+\+-[0-9]+|cpp-[0-9]+)$'
for dir in /usr/bin /bin; do
  for exe in "$dir"/*; do
    name="$(basename "$exe")"
    [[ -x "$exe" && ! -e "$tools/$name" ]] || continue
    [[ "$name" =~ $hidden ]] && continue
    ln -s "$exe" "$tools/$name"
  done
done

# Tests run from a copy outside the tree; the tools/ scripts the tests import come along.
tests="$work/suite"
rm -rf "$tests" && mkdir -p "$tests/tools"
cp -r "$here/tests" "$tests/tests"
cp "$here/tools/check_cuda_archs.py" "$here/tools/cuda_sass_report.py" "$tests/tools/"
find "$tests" -name '__pycache__' -prune -exec rm -rf {} +

# The markers (gpu, slow) of the project's pytest configuration, without the rest of pyproject.toml.
sed -n '/^\[tool\.pytest\.ini_options\]/,/^\[/p' "$here/pyproject.toml" | sed '$ { /^\[/d }' \
  >"$tests/pyproject.toml"
grep -q '^markers' "$tests/pyproject.toml" || { log "no pytest markers in pyproject.toml"; exit 1; }

# The pure wheel's backends (torch, Triton interpreter): they do not depend on the companion and
# run once, in the first venv, with the pure wheel alone.
backend_tests=(
  tests/test_reference_ops.py
  tests/test_triton_attention_mass.py
  tests/test_triton_cosine_alignment.py
  tests/test_cli.py
)
# What each companion brings (the native module): CUDA host-side tests (every tests/test_cuda_*.py:
# a new one is picked up), the module's build facts, the C++ union-find; test_cli again for
# `info` with the companion loaded.
native_tests=(
  $(cd "$tests" && ls tests/test_cuda_*.py | grep -v '^tests/test_cuda_static_sass\.py$')
  "tests/test_build.py::test_extension_imports_and_exposes_api"
  "tests/test_build.py::test_build_info_is_consistent"
  "tests/test_build.py::test_shared_object_does_not_link_torch_or_dynamic_cudart"
  "tests/test_build.py::test_check_cuda_archs_dependency_check_on_the_built_module"
  tests/test_union_find.py
  tests/test_cli.py
)
# tests/test_cuda_static_sass.py is left out: it disassembles the SASS (cuobjdump -sass needs
# nvdisasm, a toolkit tool the cuobjdump wheel lacks); the in-tree CI legs run it, and here
# tools/check_cuda_archs.py proves every arch's SASS is in the installed module.
# Source-tree checks, not installed-wheel ones: this one parses kawhi_kernels/cuda/*.py next to
# tests/ (the in-tree suite runs it).
not_here=(--deselect "tests/test_cuda_backend.py::test_python_wrappers_and_the_cpp_field_table_agree")

in_venv() {  # run "$@" in venv $1 with the build-tool-free PATH
  local venv="$1"; shift
  env -u CUDA_HOME -u CUDA_PATH -u CUDACXX -u PYTHONPATH -u KAWHI_CUDA_ARCHS \
      PATH="$venv/bin:$tools" VIRTUAL_ENV="$venv" "$@"
}

make_venv() {  # a fresh, empty venv that sees the dependency layer through a .pth file
  local venv="$1"
  rm -rf "$venv"
  "$python" -m venv --without-pip "$venv" || return 1
  local site
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
  [[ -z "$(ls -A "$site")" ]] || { log "$site is not empty"; return 1; }
  echo "$deps/site" >"$site/kawhi-check-deps.pth"
  # The layer is on sys.path after the venv's own site-packages: what pip installs wins.
  in_venv "$venv" python -c "import pip, torch, triton, transformers, scipy, skimage, pytest; print('  layer: torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'pip', pip.__version__)" >&2
}

own_distributions() {  # distributions installed into the venv itself (not the layer), sorted
  in_venv "$1" python - <<'PY'
import importlib.metadata as md, sysconfig
site = sysconfig.get_paths()["purelib"]
names = {d.metadata["Name"].lower().replace("_", "-") for d in md.distributions(path=[site])}
print(" ".join(sorted(names - {"pip", "setuptools", "wheel"})))
PY
}

status=0
check_one() {  # $1: the CUDA major of a companion, "" for the pure wheel alone; $2: the venv
  local major="$1" venv="$2" name extra="" want="kawhi-kernels"
  name="${major:+cuda$major}"; name="${name:-pure}"
  local t0=$SECONDS
  [[ -n "$major" ]] && { extra="[cuda$major]"; want="kawhi-kernels kawhi-kernels-cuda$major"; }
  # The extra must resolve the companion from the wheel dir: no index for kawhi-kernels itself,
  # and none for its requirements either (the layer must satisfy them).
  # (check_one runs under `||`, where set -e is off: every step checks its own status.)
  quiet_pip in_venv "$venv" python -m pip install -q --no-index --find-links "$dist" \
    "kawhi-kernels${extra}==$version" >&2 || { log "[$name] pip install failed"; return 1; }
  in_venv "$venv" python -m pip check >&2 || { log "[$name] pip check failed"; return 1; }
  local own
  own="$(own_distributions "$venv")" || return 1
  [[ "$own" == "$want" ]] || { log "[$name] pip installed '$own' into the venv, expected '$want'"; return 1; }
  log "[$name] installed into the venv: $own (every other requirement from the layer)"
  local info
  info="$(cd "$tests" && in_venv "$venv" kawhi-kernels info)" || { log "[$name] kawhi-kernels info failed"; return 1; }
  echo "$info" | sed "s/^/  [$name] /" >&2
  local where
  where="$(cd "$tests" && in_venv "$venv" python -c "import kawhi_kernels; print(kawhi_kernels.__file__)")" || return 1
  [[ "$where" == "$venv"/* ]] || { log "[$name] kawhi_kernels imported from $where, not the venv"; return 1; }
  if [[ -z "$major" ]]; then
    echo "$info" | grep -q '^native build  none loaded' || { log "[pure] info shows a native build"; return 1; }
    echo "$info" | grep -q 'kawhi-kernels-cuda13 *not installed' || { log "[pure] info does not say why"; return 1; }
    (cd "$tests" && in_venv "$venv" python -m pytest -q -p no:cacheprovider -m "not slow" \
       --durations=5 "${backend_tests[@]}") >&2 || return 1
  else
    echo "$info" | grep -q "^native build  kawhi-kernels-cuda$major: kawhi_kernels_cuda$major._C, CUDA $major\." \
      || { log "[$name] info does not name kawhi-kernels-cuda$major as the loaded native build"; return 1; }
    local so
    so="$(cd "$tests" && in_venv "$venv" python -c "import kawhi_kernels_cuda$major._C as m; print(m.__file__)")" || return 1
    [[ "$so" == "$venv"/* ]] || { log "[$name] the native module is $so, not the venv's"; return 1; }
    in_venv "$venv" python "$tests/tools/check_cuda_archs.py" "$so" --archs "$archs" --check-deps >&2 || return 1
    (cd "$tests" && in_venv "$venv" python -m pytest -q -p no:cacheprovider -m "not slow" \
       --durations=5 "${not_here[@]}" "${native_tests[@]}") >&2 || return 1
  fi
  log "[$name] passed in $((SECONDS - t0)) s"
}

shopt -s nullglob
natives=("$dist"/kawhi_kernels_cuda*-"$version"-*.whl)
[[ ${#natives[@]} -gt 0 ]] || { log "no native companion wheels in $dist"; exit 1; }
# The first venv checks the pure wheel alone, then adds the first companion through its extra
# (what a user who installed kawhi-kernels first does); every other companion gets a fresh venv.
# The venvs are independent: with --parallel N > 1 up to N of them run at once (each one's log is
# printed whole when it ends).
check_venv() {  # MAJOR FIRST(0/1): one fresh venv, its checks; nonzero when one failed
  local major="$1" first="$2" venv="$work/venv-cuda$1" t0=$SECONDS rc=0
  log "[cuda$major] fresh venv $venv"
  make_venv "$venv" || { log "[cuda$major] could not make the venv"; return 1; }
  log "[cuda$major] venv ready: $((SECONDS - t0)) s"
  if [[ $first == 1 ]]; then
    check_one "" "$venv" || { log "[pure] FAILED"; rc=1; }
  fi
  check_one "$major" "$venv" || { log "[cuda$major] FAILED"; rc=1; }
  return $rc
}

majors=()
for whl in "${natives[@]}"; do
  majors+=("$(basename "$whl" | sed -n 's/^kawhi_kernels_cuda\([0-9]*\)-.*/\1/p')")
done
pids=() first=1 running=0
for major in "${majors[@]}"; do
  if [[ $parallel -le 1 ]]; then
    check_venv "$major" "$first" || status=1
  else
    if [[ $running -ge $parallel ]]; then wait -n || true; running=$((running - 1)); fi
    (rc=0; check_venv "$major" "$first" >"$work/check-cuda$major.log" 2>&1 || rc=$?
     echo "$rc" >"$work/check-cuda$major.rc") &
    pids+=($!) running=$((running + 1))
  fi
  first=0
done
if [[ $parallel -gt 1 ]]; then
  wait "${pids[@]}" || true
  for major in "${majors[@]}"; do
    cat "$work/check-cuda$major.log" >&2
    [[ "$(cat "$work/check-cuda$major.rc" 2>/dev/null)" == 0 ]] || status=1
  done
fi
[[ $status == 0 ]] && log "all wheels passed" || log "FAILED"
exit $status
