// attention_mass: softmax probability mass of query rows on key regions (see ops.h).
// This file: the launcher (output and partial zeroing, kernel choice, the deterministic
// reduction of partial rows for both kernels), and the warp-per-row kernel that serves fp32
// inputs and head dims the tensor-core kernels (attention_mass_mma.cu, slots_per_cta > 0) do
// not take. Both kernels read one MassKernelParams (attention_mass_params.h).
//
// One warp per (row block, output slot); a thread block holds kMassWarps warps of consecutive row
// blocks for one slot (independent warps, no shared memory: one-warp blocks would cap occupancy
// at the per-SM block limit, 16 to 32 warps). The warp walks the rows of its block in order; for
// each row it holds q in registers (lane l: elements l, l + 32, ...), computes every visible key's
// score with a warp dot product, and
//   pass 1 (skipped when lse is given): online softmax over the visible keys -> lse (natural log);
//   pass 2: p = exp(s - lse) for the visible keys with a region, summed while consecutive keys
//           share a region and flushed into the output row when the region changes.
// Both passes compute a key's score with the same code, so they see bitwise the same value.
// Output rows: per-row outputs belong to exactly one warp (plain read-add-write, deterministic);
// segment outputs take fp32 atomicAdd, or with `deterministic` each row block writes its own
// partial row, and sum_partials_kernel adds the partial rows of each segment in a fixed order.
#include <algorithm>
#include <cmath>

#include "attention_mass_params.h"
#include "common.cuh"
#include "ops.h"

namespace kawhi {
namespace {

// Add `value` to target[region] of the warp's current output row (lane 0 writes).
__device__ __forceinline__ void flush_run(float* row_out, int region, float value, int out_mode,
                                          int lane) {
  if (region < 0 || lane != 0) return;
  if (out_mode == kOutSegmentAtomic) {
    atomicAdd(row_out + region, value);
  } else {
    row_out[region] += value;  // this warp owns the row: no other writer
  }
}

// Scaled score of one key, identical in both passes: the product is rounded on its own
// (__fmul_rn), so the compiler cannot contract it into a later subtraction in one pass only.
template <typename T>
__device__ __forceinline__ float score(const float (&qv)[kValuesPerLane], const T* key,
                                       const MassKernelParams& p, int lane) {
  return __fmul_rn(warp_dot(qv, key, p.head_dim, lane), p.scale);
}

constexpr int kMassWarps = 4;  // warps (row blocks) per thread block

template <typename T>
__global__ void __launch_bounds__(kMassWarps * kWarpSize)
attention_mass_kernel(MassKernelParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kMassWarps + threadIdx.x / kWarpSize;
  const int64_t slot = blockIdx.y;
  if (block >= p.num_row_blocks) return;  // whole warps leave together (no block-wide sync)
  const int32_t* entry = p.row_blocks + block * 4;
  const int64_t seq = entry[0];
  const int64_t row0 = entry[1];
  const int64_t nrows = entry[2];
  const int64_t segment = entry[3];
  const int64_t head = p.heads[slot];
  // Guards against a malformed table or head list (the Python wrapper builds them valid).
  if (seq < 0 || seq >= p.num_seqs || head < 0 || head >= p.hq || nrows <= 0) return;

  const int64_t q_start = p.cu_q[seq];
  const int64_t lq = p.cu_q[seq + 1] - q_start;
  const int64_t k_start = p.cu_k[seq];
  const int64_t lk = p.cu_k[seq + 1] - k_start;
  const int64_t kv = head / (p.hq / p.hk);
  const T* q = static_cast<const T*>(p.q);
  const T* keys = static_cast<const T*>(p.k) + k_start * p.k_stride_t + kv * p.k_stride_h;
  const int32_t* region = p.key_region + k_start;

  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t row = row0 + r;
    const int64_t local = row - q_start;
    // Keys [0, limit) are visible: j <= local + lk - lq under bottom-right causal masking.
    int64_t limit = lk;
    if (p.causal && local + lk - lq + 1 < lk) limit = local + lk - lq + 1;
    if (limit <= 0) continue;  // no visible key: the row contributes nothing

    int64_t out_row;
    if (p.out_mode == kOutRows) {
      out_row = row;
    } else if (p.out_mode == kOutSegmentAtomic) {
      out_row = segment;
    } else {
      out_row = block;
    }
    if (out_row < 0 || out_row >= p.num_targets) continue;
    float* row_out = p.target + (out_row * p.num_heads + slot) * p.num_regions;

    float qv[kValuesPerLane];
    load_row(q + row * p.q_stride_t + head * p.q_stride_h, p.head_dim, lane, qv);

    float lse;
    if (p.lse != nullptr) {
      lse = p.lse[head * p.lse_stride_h + row * p.lse_stride_t];
      if (!isfinite(lse)) continue;  // as the reference: a non-finite normaliser gives 0
    } else {
      float m = -INFINITY;
      float l = 0.0f;
      for (int64_t j = 0; j < limit; ++j) {
        const float s = score(qv, keys + j * p.k_stride_t, p, lane);
        const float m_new = fmaxf(m, s);
        if (m_new == -INFINITY) continue;
        l = l * expf(m - m_new) + expf(s - m_new);
        m = m_new;
      }
      lse = l > 0.0f ? m + logf(l) : 0.0f;
    }

    int run_region = -1;
    float run_sum = 0.0f;
    for (int64_t j = 0; j < limit; ++j) {
      const int rg = region[j];
      if (rg < 0 || rg >= p.num_regions) continue;
      const float s = score(qv, keys + j * p.k_stride_t, p, lane);
      const float prob = fminf(expf(s - lse), 1.0f);  // capped at 1 as on every backend
      if (rg != run_region) {
        flush_run(row_out, run_region, run_sum, p.out_mode, lane);
        run_region = rg;
        run_sum = 0.0f;
      }
      run_sum += prob;
    }
    flush_run(row_out, run_region, run_sum, p.out_mode, lane);
  }
}

// out[s, e] = sum of partial[b, e] over the blocks b listed for segment s, in list order.
__global__ void sum_partials_kernel(const float* partial, float* out, const int32_t* seg_start,
                                    const int32_t* seg_blocks, int64_t num_segments,
                                    int64_t row_elems, int64_t num_blocks) {
  const int64_t total = num_segments * row_elems;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = idx / row_elems;
    const int64_t e = idx % row_elems;
    float acc = 0.0f;
    for (int64_t i = seg_start[s]; i < seg_start[s + 1]; ++i) {
      const int64_t b = seg_blocks[i];
      if (b >= 0 && b < num_blocks) acc += partial[b * row_elems + e];
    }
    out[idx] = acc;
  }
}

constexpr int kReduceThreads = 256;
constexpr int64_t kMaxReduceBlocks = 65535;

}  // namespace

// The tensor-core kernel (attention_mass_mma.cu), chosen by slots_per_cta > 0.
void launch_attention_mass_mma(const MassKernelParams& p, const AttentionMassArgs& a,
                               cudaStream_t stream);

void launch_attention_mass(const AttentionMassArgs& a) {
  validate(a);
  DeviceGuard guard(a.device, "attention_mass (select device)");
  const cudaStream_t stream = as_stream(a.stream);
  const int64_t row_elems = a.num_heads * a.num_regions;
  const int64_t out_rows = a.segmented ? a.num_segments : a.total_q;

  float* out = reinterpret_cast<float*>(a.out);
  if (out_rows * row_elems > 0) {
    KAWHI_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float) * out_rows * row_elems, stream),
                     "attention_mass (zero out)");
  }
  if (row_elems == 0 || out_rows == 0 || a.num_row_blocks == 0) return;

  const MassKernelParams p = make_mass_params(a);
  if (p.out_mode == kOutPartial) {
    KAWHI_CUDA_CHECK(cudaMemsetAsync(p.target, 0, sizeof(float) * a.num_row_blocks * row_elems,
                                     stream),
                     "attention_mass (zero partial)");
  }
  if (a.slots_per_cta > 0) {  // fp16/bf16, head_dim % 16 == 0 (validated)
    launch_attention_mass_mma(p, a, stream);
  } else {
    const dim3 grid(blocks_for(a.num_row_blocks, kMassWarps), static_cast<unsigned>(a.num_heads));
    dispatch_dtype(a.dtype, [&](auto tag) {
      using T = decltype(tag);
      attention_mass_kernel<T><<<grid, kMassWarps * kWarpSize, 0, stream>>>(p);
    });
    KAWHI_CHECK_LAUNCH("attention_mass_kernel");
  }

  if (p.out_mode == kOutPartial) {
    const int64_t total = a.num_segments * row_elems;
    // Grid-stride loop: at most kMaxReduceBlocks blocks (capped in int64, before narrowing).
    const unsigned blocks = static_cast<unsigned>(
        std::min<int64_t>((total + kReduceThreads - 1) / kReduceThreads, kMaxReduceBlocks));
    sum_partials_kernel<<<blocks, kReduceThreads, 0, stream>>>(
        p.target, out, reinterpret_cast<const int32_t*>(a.segment_block_start),
        reinterpret_cast<const int32_t*>(a.segment_blocks), a.num_segments, row_elems,
        a.num_row_blocks);
    KAWHI_CHECK_LAUNCH("attention_mass sum_partials_kernel");
  }
}

}  // namespace kawhi
