#!/usr/bin/env bash
# Assemble a CUDA 12.4 toolkit (nvcc and its tools, headers, static runtime) from registry
# packages only, into a private prefix, without touching the system; print the prefix (a
# CUDA_HOME) on stdout. Cached: a complete prefix is reused as it is.
#
#   Debian trixie non-free: nvidia-cuda-toolkit 12.4.131 (nvcc, cicc, ptxas, fatbinary, nvlink,
#     cudafe++, cuobjdump, libdevice) and nvidia-cuda-dev 12.4.127 (only libcudart_static.a,
#     libcudadevrt.a and libculibos.a are kept from its 934 MB); fetched with `apt-get download`
#     through a private apt configuration (its own sources list and package lists: the system's
#     are not changed) and unpacked with dpkg -x / dpkg-deb; the .debs are deleted once the
#     prefix is complete (about 200 MB stays).
#   PyPI: nvidia-cuda-nvcc-cu12==12.4.131 (include/crt), nvidia-cuda-runtime-cu12==12.4.127
#     (runtime headers), nvidia-cuda-cccl-cu12==12.6.77 (libcu++/CUB/Thrust with nv/target,
#     which the 12.4 cccl wheels lack).
#
# Usage: tools/cuda12_toolchain.sh [--cache DIR] [--python PYTHON] [--mirror URL]
#   --cache   default: $KAWHI_TOOLCHAIN_CACHE, else ~/.cache/kawhi-toolchains
#   --python  interpreter whose pip downloads the wheels (default: python3)
#   --mirror  the Debian archive (default: $KAWHI_DEBIAN_MIRROR, else http://deb.debian.org/debian);
#             only used while the prefix is not cached. An unreachable mirror or one without
#             the packages fails here, naming the mirror, before anything is downloaded.
set -euo pipefail

cache="${KAWHI_TOOLCHAIN_CACHE:-$HOME/.cache/kawhi-toolchains}"
python="python3"
mirror="${KAWHI_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cache) cache="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --mirror) mirror="$2"; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "cuda12_toolchain.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

toolkit_deb_version="12.4.131~12.4.1-2"
dev_deb_version="12.4.127~12.4.1-2"
prefix="$cache/cuda-12.4"
if [[ -f "$prefix/.complete" ]]; then
  echo "$prefix"
  exit 0
fi
log() { echo "cuda12_toolchain.sh: $*" >&2; }

# ---------------------------------------------------------------- Debian packages
apt_dir="$cache/apt-trixie"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/debs"
mirror="${mirror%/}"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb [signed-by=$keyring] $mirror trixie non-free" >"$apt_dir/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
          -o "APT::Sandbox::User=root")
want=("nvidia-cuda-toolkit=$toolkit_deb_version" "nvidia-cuda-dev=$dev_deb_version")
deb_of() { compgen -G "$apt_dir/debs/${1%%=*}_${1#*=}_amd64.deb" | head -1 || true; }
missing=()
for pkg in "${want[@]}"; do
  [[ -n "$(deb_of "$pkg")" ]] || missing+=("$pkg")
done
fail_mirror() {
  log "ERROR: $*"
  log "the CUDA 12.4 toolchain comes from Debian trixie non-free at $mirror; set"
  log "KAWHI_DEBIAN_MIRROR (or --mirror) to a reachable Debian mirror, or put a complete prefix"
  log "at $prefix (see the header of this script)"
  exit 1
}
if [[ ${#missing[@]} -gt 0 ]]; then
  command -v apt-get >/dev/null || fail_mirror "apt-get is not installed (a Debian/Ubuntu machine is needed)"
  [[ -f "$keyring" ]] || fail_mirror "no Debian archive keyring at $keyring (apt-get install debian-archive-keyring)"
  # apt-get update only warns about an unreachable source and exits 0: probe the mirror first.
  release_url="$mirror/dists/trixie/InRelease"
  if command -v curl >/dev/null; then
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 "$release_url")" \
      || fail_mirror "cannot reach $release_url (curl exit status $?: no network, DNS or proxy?)"
    [[ "$code" == 200 ]] || fail_mirror "$release_url answered HTTP $code"
  fi
  log "apt-get update (private lists: Debian trixie non-free at $mirror)"
  rm -f "$apt_dir"/lists/*_Packages* 2>/dev/null || true
  apt-get "${apt_opts[@]}" -qq update >&2 || fail_mirror "apt-get update failed"
  compgen -G "$apt_dir/lists/*trixie_non-free_binary-amd64_Packages*" >/dev/null \
    || fail_mirror "apt-get update read no trixie non-free package list"
  log "apt-get download ${missing[*]} (about 1 GB, once)"
  (cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" -qq download "${missing[@]}" >&2) \
    || fail_mirror "apt-get download ${missing[*]} failed"
fi
toolkit_deb="$(deb_of "${want[0]}")"
dev_deb="$(deb_of "${want[1]}")"
[[ -n "$toolkit_deb" && -n "$dev_deb" ]] || { log "apt-get download left no ${want[*]}"; exit 1; }

# ---------------------------------------------------------------- PyPI wheels (headers)
wheels="$cache/pip-cu12"
mkdir -p "$wheels"
if ! ls "$wheels"/nvidia_cuda_cccl_cu12-12.6.77-*.whl >/dev/null 2>&1 \
   || ! ls "$wheels"/nvidia_cuda_nvcc_cu12-12.4.131-*.whl >/dev/null 2>&1 \
   || ! ls "$wheels"/nvidia_cuda_runtime_cu12-12.4.127-*.whl >/dev/null 2>&1; then
  log "pip download nvidia-cuda-{nvcc,runtime,cccl}-cu12"
  "$python" -m pip download -q --no-deps -d "$wheels" nvidia-cuda-nvcc-cu12==12.4.131 \
    nvidia-cuda-runtime-cu12==12.4.127 nvidia-cuda-cccl-cu12==12.6.77 >&2
fi

# ---------------------------------------------------------------- the prefix
work="$(mktemp -d "$cache/.cuda-12.4.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "assembling $prefix"
dpkg -x "$toolkit_deb" "$work/tk"
mkdir -p "$work/dev"
dpkg-deb --fsys-tarfile "$dev_deb" | tar -x -C "$work/dev" --wildcards \
  '*/libcudart_static.a' '*/libculibos.a' '*/libcudadevrt.a'
for whl in "$wheels"/nvidia_cuda_{nvcc,runtime,cccl}_cu12-*.whl; do
  "$python" -m zipfile -e "$whl" "$work/wheels"
done

out="$work/cuda-12.4"
mkdir -p "$out/bin" "$out/nvvm/bin" "$out/nvvm/libdevice" "$out/include" "$out/lib64"
tk="$work/tk/usr/lib/nvidia-cuda-toolkit"
cp "$tk/bin/nvcc" "$out/bin/nvcc"                       # the ELF driver (usr/bin/nvcc is a wrapper)
cp -r "$tk/bin/crt" "$out/bin/crt"
for tool in ptxas fatbinary nvlink cudafe++ bin2c cuobjdump nvdisasm nvprune cu++filt; do
  cp "$work/tk/usr/bin/$tool" "$out/bin/$tool"
done
cp "$tk/bin/cicc" "$out/nvvm/bin/cicc"
cp "$tk/libdevice/libdevice.10.bc" "$out/nvvm/libdevice/"
for part in cuda_runtime cuda_nvcc cuda_cccl; do
  cp -r "$work/wheels/nvidia/$part/include/." "$out/include/"
done
find "$out/include" -name '__init__.py' -delete
find "$work/dev" \( -name libcudart_static.a -o -name libculibos.a -o -name libcudadevrt.a \) -exec cp {} "$out/lib64/" \;
[[ -f "$out/lib64/libcudart_static.a" ]] || { log "libcudart_static.a not found in $dev_deb"; exit 1; }
# The layout nvcc expects of a toolkit: paths relative to its own bin dir.
cat >"$out/bin/nvcc.profile" <<'EOF'
TOP              = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
PATH            += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64"
CUDAFE_FLAGS    +=
PTXAS_FLAGS     +=
EOF
ln -s lib64 "$out/lib"
"$out/bin/nvcc" --version >&2
touch "$out/.complete"
rm -rf "$prefix"
mv "$out" "$prefix"
rm -f "$toolkit_deb" "$dev_deb"
echo "$prefix"
