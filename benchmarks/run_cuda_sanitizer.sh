#!/usr/bin/env bash
# Run every CUDA kernel of kawhi_kernels._C on small cases under NVIDIA compute-sanitizer
# (memcheck and racecheck by default) on a machine with a GPU. Each case also checks its result
# against the torch reference, so a run that is clean but wrong fails too.
#
# Usage: benchmarks/run_cuda_sanitizer.sh [--tools "memcheck racecheck synccheck initcheck"]
#                                         [--python python3] [--log-dir DIR]
# Builds the extension in place first (KAWHI_CUDA=1, KAWHI_CUDA_ARCHS default 90) when the
# importable one has no CUDA kernels. Exit status: 0 when every tool reports no error and every
# case matches, else 1.
#
# Cases (all tiny): attention_mass per-row / segment atomic / segment deterministic / given lse,
# in fp32, fp16 and bf16, GQA 4:1 and 7:1, a row with no visible key, a sequence without keys;
# cosine_alignment per-head and mean, on aligned rows (16-byte loads) and on unaligned rows / an
# odd head dim (scalar fallback); grid_pyramid on ragged grids with non-dividing cell sizes,
# unaligned rows, and a frame cut into strips; SGUF descriptors on a 28-px grid and on an image
# smaller than the Gaussian halo.
set -euo pipefail
cd "$(dirname "$0")/.."

tools="memcheck racecheck"
python="python3"
log_dir="${OUT:-/tmp}/kawhi-sanitizer"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tools) tools="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "run_cuda_sanitizer.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

sanitizer="$(command -v compute-sanitizer || true)"
for d in "${CUDA_HOME:-}" /usr/local/cuda; do
  if [[ -z "$sanitizer" && -n "$d" && -x "$d/bin/compute-sanitizer" ]]; then
    sanitizer="$d/bin/compute-sanitizer"
  fi
done
if [[ -z "$sanitizer" ]]; then
  sanitizer="$(ls /opt/nvidia/*/compute-sanitizer/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1 || true)"
fi
[[ -n "$sanitizer" ]] || { echo "run_cuda_sanitizer.sh: compute-sanitizer not found" >&2; exit 1; }

if ! "$python" -c 'import kawhi_kernels._C as c; assert c.has_cuda()' 2>/dev/null; then
  echo "run_cuda_sanitizer.sh: building kawhi_kernels._C with CUDA (archs ${KAWHI_CUDA_ARCHS:-90})"
  KAWHI_CUDA=1 KAWHI_CUDA_ARCHS="${KAWHI_CUDA_ARCHS:-90}" \
    "$python" -m pip install -q --no-deps --no-build-isolation -e .
fi

mkdir -p "$log_dir"
case_file="$log_dir/sanitizer_cases.py"
cat >"$case_file" <<'PY'
"""Small cases for every kawhi_kernels CUDA kernel, each checked against the torch reference."""
import math
import sys

import torch

from kawhi_kernels.cuda import (attention_mass_cuda, cosine_alignment_cuda, grid_pyramid_cuda,
                                patch_descriptors_cuda)
from kawhi_kernels.reference.attention_mass import attention_mass_reference
from kawhi_kernels.reference.cosine_alignment import cosine_alignment_reference
from kawhi_kernels.reference.grid_pyramid import grid_pyramid_reference
from kawhi_kernels.regions import patch_descriptors

dev = torch.device("cuda")
g = torch.Generator().manual_seed(0)
failures = []


def close(name, got, want, atol=2e-5, rtol=2e-4):
    torch.cuda.synchronize()
    if got.shape != want.shape or not torch.allclose(got, want.to(got.dtype), atol=atol, rtol=rtol):
        failures.append(name)
        print(f"MISMATCH {name}: max abs err {(got - want).abs().max().item() if got.shape == want.shape else 'shape'}")
    else:
        print(f"ok {name}")


lens_q, lens_k = [6, 0, 9, 4], [3, 5, 12, 0]      # 6 rows > 3 keys: early causal rows see none
cu_q = torch.tensor([0, 6, 6, 15, 19], dtype=torch.int32, device=dev)
cu_k = torch.tensor([0, 3, 8, 20, 20], dtype=torch.int32, device=dev)
region = torch.tensor([0, -1, 1, 2, 2, -1, 0, 1, -1, 0, 0, 1, 2, 3, 3, 3, -1, 1, 2, 0],
                      dtype=torch.int32, device=dev)
seg = torch.tensor([0, 0, 1, 1, -1, 2, 0, 0, 0, 1, 1, 1, 2, -1, 2, 3, 3, 3, 3],
                   dtype=torch.int32, device=dev)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for hq, hk, d in ((8, 2, 64), (7, 1, 80)):
        q = torch.randn(19, hq, d, generator=g).to(dev, dtype)
        k = torch.randn(20, hk, d, generator=g).to(dev, dtype)
        heads = [hq - 1, 0, 2]
        tag = f"{str(dtype)[6:]} hq={hq} hk={hk} d={d}"
        want = attention_mass_reference(q, k, cu_q, cu_k, region, 4, heads=heads)
        close(f"attention_mass rows {tag}", attention_mass_cuda(q, k, cu_q, cu_k, region, 4, heads=heads), want)
        want = attention_mass_reference(q, k, cu_q, cu_k, region, 4, heads=heads, query_segment=seg, num_segments=5)
        for det in (False, True):
            got = attention_mass_cuda(q, k, cu_q, cu_k, region, 4, heads=heads, query_segment=seg,
                                      num_segments=5, deterministic=det, block_rows=2)
            close(f"attention_mass segments det={det} {tag}", got, want)
        lse = torch.zeros(hq, 19, device=dev)   # any finite lse: p = exp(s - lse)
        want = attention_mass_reference(q, k, cu_q, cu_k, region, 4, lse=lse, causal=False)
        close(f"attention_mass lse {tag}", attention_mass_cuda(q, k, cu_q, cu_k, region, 4, lse=lse, causal=False), want, rtol=1e-3)
        for per_head in (False, True):
            want = cosine_alignment_reference(q, k, cu_q, cu_k, region, 4, heads=heads, per_head=per_head)
            got = cosine_alignment_cuda(q, k, cu_q, cu_k, region, 4, heads=heads, per_head=per_head)
            close(f"cosine_alignment per_head={per_head} {tag}", got, want, atol=2e-6, rtol=2e-5)
for dtype in (torch.float32, torch.bfloat16):
    for d, offset in ((100, 0), (64, 1)):              # odd head dim / unaligned rows: scalar path
        q = torch.randn(19, 8, d + offset, generator=g).to(dev, dtype)[..., offset:]
        k = torch.randn(20, 2, d + offset, generator=g).to(dev, dtype)[..., offset:]
        for per_head in (False, True):
            want = cosine_alignment_reference(q, k, cu_q, cu_k, region, 4, heads=[7, 0], per_head=per_head)
            got = cosine_alignment_cuda(q, k, cu_q, cu_k, region, 4, heads=[7, 0], per_head=per_head)
            close(f"cosine_alignment fallback d={d} offset={offset} per_head={per_head} {str(dtype)[6:]}",
                  got, want, atol=2e-6, rtol=2e-5)
    for grids, levels in (([[1, 5, 7], [2, 3, 3], [1, 13, 17]], [3, 2, 6, 1, 5]),
                          ([[1, 120, 110]], [1, 2, 4, 8])):   # 13200 tokens: cut into strips
        n = sum(t * h * w for t, h, w in grids)
        mass = torch.rand(3, n + 1, generator=g).to(dev, dtype)[:, 1:]   # rows not 16-byte aligned
        want = grid_pyramid_reference(mass, torch.tensor(grids), levels)
        for i, (a, b) in enumerate(zip(grid_pyramid_cuda(mass, torch.tensor(grids), levels), want)):
            close(f"grid_pyramid {grids[0]} level {levels[i]} {str(dtype)[6:]}", a, b, atol=1e-3, rtol=1e-5)
for shape, grid in (((56, 84), (2, 3)), ((3, 6), (1, 2))):
    img = torch.randint(0, 256, (2, *shape, 3), generator=g, dtype=torch.uint8).to(dev)
    want = patch_descriptors(img, grid)
    scale = float(want[0].max()) + 100.0      # λmin's error scales with λmax; L is 0..100
    for name, a, b in zip(("lam_max", "lam_min", "lightness"), patch_descriptors_cuda(img, grid), want):
        close(f"sguf {name} {shape}", a, b, atol=2e-5 * scale, rtol=1e-4)
torch.cuda.synchronize()
print(f"{len(failures)} mismatches")
sys.exit(1 if failures else 0)
PY

status=0
for tool in $tools; do
  log="$log_dir/$tool.log"
  echo "== compute-sanitizer --tool $tool ($log)"
  if "$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 50 \
       "$python" "$case_file" >"$log" 2>&1; then
    echo "   clean: $(grep -c '^ok ' "$log") cases ok; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -n 1)"
  else
    status=1
    echo "   FAILED (exit status above 0): tail of $log"
    tail -n 40 "$log"
  fi
done
exit "$status"
