#!/usr/bin/env bash
# Build a kawhi-kernels wheel for one CUDA toolkit, with the CUDA version in its local version
# label (e.g. kawhi_kernels-0.1.0+cu130-cp311-cp311-linux_x86_64.whl), then check that the
# extension holds SASS for every requested architecture and links neither torch nor a dynamic
# CUDA runtime. Fails (non-zero exit) if any step fails.
#
# Usage: tools/build_wheel.sh [--cuda-home PATH] [--archs "80;86;89;90"] [--out DIR]
#                             [--python PYTHON] [--jobs N]
#   --cuda-home  toolkit root holding bin/nvcc (default: $CUDA_HOME, else nvcc on PATH). A
#                toolkit assembled from PyPI works too: site-packages/nvidia/cu13 of a venv with
#                nvidia-cuda-nvcc, nvidia-cuda-crt, nvidia-nvvm, nvidia-cuda-runtime and
#                nvidia-cuda-cccl installed.
#   --archs      SM list (default: $KAWHI_CUDA_ARCHS, else "80;86;89;90"); SASS for each, PTX
#                for the highest.
#   --out        where the wheel goes (default: dist/)
#   --python     interpreter that builds (default: python3); it needs setuptools, wheel,
#                pybind11 and cmake installed (the build runs without isolation).
#   --jobs       parallel compile jobs (default: number of CPUs)
# cuobjdump for the check: $CUDA_HOME/bin, PATH, or the PyPI package nvidia-cuda-cuobjdump in
# the building Python (see tools/check_cuda_archs.py).
#
# The build runs in a fresh copy of the sources, so no CMake cache of another toolkit is reused.
# The wheel is tagged linux_x86_64 (not manylinux: repair it with auditwheel to publish).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cuda_home="${CUDA_HOME:-}"
archs="${KAWHI_CUDA_ARCHS:-80;86;89;90}"
out="$here/dist"
python="python3"
jobs="$(nproc 2>/dev/null || echo 2)"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cuda-home) cuda_home="$2"; shift 2 ;;
    --archs) archs="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "build_wheel.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -n "$cuda_home" ]]; then
  nvcc="$cuda_home/bin/nvcc"
  [[ -x "$nvcc" ]] || { echo "build_wheel.sh: no executable $nvcc (--cuda-home/CUDA_HOME)" >&2; exit 1; }
else
  nvcc="$(command -v nvcc || true)"
  [[ -n "$nvcc" ]] || { echo "build_wheel.sh: nvcc not found: pass --cuda-home or set CUDA_HOME" >&2; exit 1; }
  cuda_home="$(cd "$(dirname "$nvcc")/.." && pwd)"
fi
release="$("$nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
[[ -n "$release" ]] || { echo "build_wheel.sh: cannot read the CUDA version from '$nvcc --version'" >&2; exit 1; }
read -r major minor <<<"$release"
label="cu${major}${minor}"
echo "build_wheel.sh: CUDA ${major}.${minor} ($nvcc), archs '$archs', label +$label"

src="$(mktemp -d /tmp/kawhi-wheel-src.XXXXXX)"
trap 'rm -rf "$src"' EXIT
tar -C "$here" --exclude='__pycache__' --exclude='*.so' --exclude='*.pyc' \
    -cf - pyproject.toml setup.py CMakeLists.txt README.md csrc kawhi_kernels | tar -C "$src" -xf -

mkdir -p "$out"
export CUDA_HOME="$cuda_home" PATH="$cuda_home/bin:$PATH"
export KAWHI_CUDA=1 KAWHI_CUDA_ARCHS="$archs" KAWHI_LOCAL_VERSION="$label"
export CMAKE_BUILD_PARALLEL_LEVEL="$jobs"
unset CUDACXX
wheel_dir="$src/wheelhouse"
"$python" -m pip wheel --no-deps --no-build-isolation --no-cache-dir -w "$wheel_dir" "$src"

shopt -s nullglob
wheels=("$wheel_dir"/kawhi_kernels-*+"$label"-*.whl)
[[ ${#wheels[@]} -eq 1 ]] || { echo "build_wheel.sh: expected one +$label wheel, got: $(ls "$wheel_dir")" >&2; exit 1; }
wheel="${wheels[0]}"

unpacked="$src/unpacked"
"$python" -m zipfile -e "$wheel" "$unpacked"
sos=("$unpacked"/kawhi_kernels/_C*.so)
[[ ${#sos[@]} -eq 1 ]] || { echo "build_wheel.sh: the wheel holds no kawhi_kernels/_C*.so" >&2; exit 1; }
"$python" "$here/tools/check_cuda_archs.py" "${sos[0]}" --archs "$archs" --check-deps

cp "$wheel" "$out/"
echo "build_wheel.sh: wrote $out/$(basename "$wheel")"
