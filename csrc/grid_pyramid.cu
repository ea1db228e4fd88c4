// grid_pyramid: sums of per-token values over square cells of every frame, all levels in one
// launch (see ops.h for the strip decomposition).
//
// One thread block per (leading row, strip). The strip's rows x width tokens are contiguous in
// the leading row of mass: the block streams them once with 16-byte loads (scalar head and
// tail, vec_load.cuh) into shared memory as fp32 (16-byte shared stores). Levels follow in
// ascending cell size s: a thread per cell sums its cell from the largest earlier level p with
// p | s (f = s/p cells of p per side, ragged at the strip's right and bottom edges) or, without
// one, from the tokens; the sums stay in shared memory for the later levels and go to the
// level's output row. Every output cell is written by one thread in a fixed order:
// deterministic, no atomics.
#include <cstdint>

#include "common.cuh"
#include "ops.h"
#include "vec_load.cuh"

namespace kawhi {
namespace {

constexpr int kPyramidThreads = 256;
constexpr int64_t kDefaultSharedBytes = 48 * 1024;  // more needs an opt-in per kernel

template <typename T>
__global__ void __launch_bounds__(kPyramidThreads)
grid_pyramid_kernel(const T* mass, int64_t mass_stride, const int64_t* strips, int64_t num_strips,
                    const int32_t* cell_sizes, int num_levels, const int64_t* cell_base,
                    float* const* outs, const int64_t* out_cells, int64_t shared_floats) {
  extern __shared__ float4 smem_vectors[];  // float4: 16-byte aligned for stage_widened
  float* smem = reinterpret_cast<float*>(smem_vectors);
  __shared__ int sizes[kMaxPyramidLevels];
  __shared__ int offsets[kMaxPyramidLevels];  // shared-memory offset of each level's cells

  const int64_t strip = blockIdx.x % num_strips;
  const int64_t lead = blockIdx.x / num_strips;
  const int64_t token0 = strips[strip * 3];
  const int width = static_cast<int>(strips[strip * 3 + 1]);
  const int rows = static_cast<int>(strips[strip * 3 + 2]);
  const int tokens = rows * width;
  const int tid = threadIdx.x;

  int next = tokens;  // every thread walks the (short) level list: same total everywhere
  for (int l = 0; l < num_levels; ++l) {
    const int s = cell_sizes[l];
    if (tid == 0) {
      sizes[l] = s;
      offsets[l] = s == 1 ? 0 : next;  // size 1: the staged tokens are the level
    }
    if (s > 1) next += ((rows + s - 1) / s) * ((width + s - 1) / s);
  }
  // The host sized shared memory for its largest strip (grid_pyramid_shared_floats); a table
  // out of step with it would write past the allocation.
  if (next + kStageSlack > shared_floats) __trap();

  // The strip as fp32 (tile[0, tokens)), then the levels' cells at tile + offsets[l].
  float* tile = stage_widened(mass + lead * mass_stride + token0, tokens, smem, tid,
                              kPyramidThreads);
  __syncthreads();

  for (int l = 0; l < num_levels; ++l) {
    const int s = sizes[l];
    const int ch = (rows + s - 1) / s;
    const int cw = (width + s - 1) / s;
    float* out = outs[l] + lead * out_cells[l] + cell_base[strip * num_levels + l];
    if (s == 1) {
      for (int c = tid; c < tokens; c += kPyramidThreads) out[c] = tile[c];
      continue;  // nothing written to shared memory: no barrier needed
    }
    int p = 1, src = 0;  // source level: cell size and shared-memory offset (1, 0: the tokens)
    for (int q = l - 1; q >= 0; --q) {
      if (s % sizes[q] == 0) {
        p = sizes[q];
        src = offsets[q];
        break;
      }
    }
    const int f = s / p;                     // source cells per side of a cell
    const int src_h = (rows + p - 1) / p;    // source grid of the strip
    const int src_w = (width + p - 1) / p;
    float* dst = tile + offsets[l];
    for (int c = tid; c < ch * cw; c += kPyramidThreads) {
      const int i = c / cw;
      const int j = c - i * cw;
      const int r_end = min((i + 1) * f, src_h);
      const int c_end = min((j + 1) * f, src_w);
      float sum = 0.0f;
      for (int r = i * f; r < r_end; ++r) {
        const float* line = tile + src + r * src_w;
        for (int k = j * f; k < c_end; ++k) sum += line[k];
      }
      dst[c] = sum;
      out[c] = sum;
    }
    __syncthreads();
  }
}

}  // namespace

void launch_grid_pyramid(const GridPyramidArgs& a) {
  validate(a);
  if (a.num_lead == 0 || a.num_strips == 0) return;
  DeviceGuard guard(a.device, "grid_pyramid (select device)");
  const cudaStream_t stream = as_stream(a.stream);
  const int64_t bytes = a.shared_floats * static_cast<int64_t>(sizeof(float));
  int limit = 0;
  KAWHI_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          a.device),
                   "grid_pyramid (shared memory limit)");
  const int64_t static_bytes = 2 * kMaxPyramidLevels * static_cast<int64_t>(sizeof(int));
  if (bytes + static_bytes > limit)
    throw std::invalid_argument(
        "grid_pyramid: shared_floats: a strip needs " + std::to_string(bytes) +
        " bytes of shared memory per block, the device allows " +
        std::to_string(limit - static_bytes) + "; split frames into smaller strips");
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = grid_pyramid_kernel<T>;
    if (bytes > kDefaultSharedBytes)
      KAWHI_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(bytes)),
                       "grid_pyramid (shared memory size)");
    kernel<<<static_cast<unsigned>(a.num_lead * a.num_strips), kPyramidThreads,
             static_cast<size_t>(bytes), stream>>>(
        reinterpret_cast<const T*>(a.mass), a.mass_stride,
        reinterpret_cast<const int64_t*>(a.strips), a.num_strips,
        reinterpret_cast<const int32_t*>(a.cell_sizes), static_cast<int>(a.num_levels),
        reinterpret_cast<const int64_t*>(a.cell_base), reinterpret_cast<float* const*>(a.outs),
        reinterpret_cast<const int64_t*>(a.out_cells), a.shared_floats);
  });
  KAWHI_CHECK_LAUNCH("grid_pyramid grid_pyramid_kernel");
}

}  // namespace kawhi
