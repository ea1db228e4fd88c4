// cosine_alignment: mean cosine of each query row to the keys of each region of its sequence,
// in factorised form (see ops.h). Two kernels, no atomics (bit-reproducible):
//
// region_mean_keys_kernel: one block of kMeanWarps warps per (sequence, region, KV head). Warp w
//   scans the sequence's keys in chunks of 32 (chunks w, w + kMeanWarps, ...), finds the keys of
//   its region with a ballot, and adds their unit vectors (lanes split the head dim) in key
//   order; the warps' partial sums are then added in warp order and divided by the key count.
// cosine_rows_kernel: one warp per query row. For each selected head in slot order it forms the
//   unit query and takes one warp dot product per region with the head's KV-head mean key,
//   writing per-head values or summing them and dividing by the number of heads at the end.
#include <cmath>

#include "common.cuh"
#include "ops.h"

namespace kawhi {
namespace {

constexpr int kMeanWarps = 8;
constexpr int kRowsPerBlock = 4;  // warps (rows) per block of cosine_rows_kernel

// Unit vector of a warp-held row in place (x / |x|; a zero vector stays zero).
__device__ __forceinline__ void normalise(float (&v)[kValuesPerLane]) {
  float sq = 0.0f;
#pragma unroll
  for (int t = 0; t < kValuesPerLane; ++t) sq = fmaf(v[t], v[t], sq);
  const float norm = sqrtf(warp_sum(sq));
#pragma unroll
  for (int t = 0; t < kValuesPerLane; ++t) v[t] = norm > 0.0f ? v[t] / norm : 0.0f;
}

template <typename T>
__global__ void __launch_bounds__(kMeanWarps * kWarpSize)
region_mean_keys_kernel(const T* k, const int32_t* cu_k, const int32_t* key_region, float* kbar,
                        int64_t num_regions, int64_t hk, int64_t head_dim, int64_t k_stride_t,
                        int64_t k_stride_h) {
  __shared__ float partial[kMeanWarps][kMaxHeadDim];
  __shared__ int counts[kMeanWarps];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t item = blockIdx.x;  // (seq * num_regions + region) * hk + kv
  const int64_t kv = item % hk;
  const int64_t region = (item / hk) % num_regions;
  const int64_t seq = item / (hk * num_regions);
  const int64_t k_start = cu_k[seq];
  const int64_t lk = cu_k[seq + 1] - k_start;
  const T* keys = k + k_start * k_stride_t + kv * k_stride_h;

  float acc[kValuesPerLane];
#pragma unroll
  for (int t = 0; t < kValuesPerLane; ++t) acc[t] = 0.0f;
  int count = 0;
  for (int64_t chunk = static_cast<int64_t>(warp) * kWarpSize; chunk < lk;
       chunk += static_cast<int64_t>(kMeanWarps) * kWarpSize) {
    const int64_t mine = chunk + lane;
    const bool match = mine < lk && key_region[k_start + mine] == region;
    unsigned hits = __ballot_sync(kFullMask, match);
    while (hits != 0u) {  // the chunk's matching keys, in ascending key order
      const int bit = __ffs(hits) - 1;
      hits &= hits - 1u;
      float v[kValuesPerLane];
      load_row(keys + (chunk + bit) * k_stride_t, head_dim, lane, v);
      normalise(v);
#pragma unroll
      for (int t = 0; t < kValuesPerLane; ++t) acc[t] += v[t];
      ++count;
    }
  }
#pragma unroll
  for (int t = 0; t < kValuesPerLane; ++t) {
    const int64_t c = lane + static_cast<int64_t>(t) * kWarpSize;
    if (c < head_dim) partial[warp][c] = acc[t];
  }
  if (lane == 0) counts[warp] = count;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < kMeanWarps; ++w) total += counts[w];
  for (int64_t c = threadIdx.x; c < head_dim; c += blockDim.x) {
    float sum = 0.0f;
    for (int w = 0; w < kMeanWarps; ++w) sum += partial[w][c];
    kbar[item * head_dim + c] = total > 0 ? sum / static_cast<float>(total) : 0.0f;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * kWarpSize)
cosine_rows_kernel(const T* q, const int32_t* cu_q, const int32_t* heads, const float* kbar,
                   float* out, int64_t total_q, int64_t num_seqs, int64_t hq, int64_t hk,
                   int64_t head_dim, int64_t num_regions, int64_t num_heads, int64_t q_stride_t,
                   int64_t q_stride_h, int per_head) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= total_q) return;  // whole warps leave together
  // Sequence of the row: the last b with cu_q[b] <= row (rows only exist in non-empty sequences).
  int64_t lo = 0, hi = num_seqs;  // invariant: cu_q[lo] <= row < cu_q[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (cu_q[mid] <= row) lo = mid; else hi = mid;
  }
  const int64_t seq = lo;
  const int64_t group = hq / hk;
  for (int64_t slot = 0; slot < num_heads; ++slot) {
    const int64_t head = heads[slot];
    if (head < 0 || head >= hq) continue;  // guard; the Python wrapper validates heads
    float v[kValuesPerLane];
    load_row(q + row * q_stride_t + head * q_stride_h, head_dim, lane, v);
    normalise(v);
    const float* means = kbar + (seq * num_regions * hk + head / group) * head_dim;
    for (int64_t r = 0; r < num_regions; ++r) {
      const float c = warp_dot(v, means + r * hk * head_dim, head_dim, lane);
      if (lane == 0) {
        if (per_head) out[(row * num_heads + slot) * num_regions + r] = c;
        else out[row * num_regions + r] += c;  // this warp owns the row
      }
    }
  }
  if (!per_head && lane == 0) {
    for (int64_t r = 0; r < num_regions; ++r)
      out[row * num_regions + r] /= static_cast<float>(num_heads);
  }
}

}  // namespace

void launch_cosine_alignment(const CosineAlignmentArgs& a) {
  validate(a);
  DeviceGuard guard(a.device, "cosine_alignment (select device)");
  const cudaStream_t stream = as_stream(a.stream);
  const int64_t out_elems = a.total_q * (a.per_head ? a.num_heads : 1) * a.num_regions;
  float* out = reinterpret_cast<float*>(a.out);
  if (out_elems == 0) return;
  KAWHI_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float) * out_elems, stream),
                   "cosine_alignment (zero out)");
  float* kbar = reinterpret_cast<float*>(a.kbar);
  const int64_t items = a.num_seqs * a.num_regions * a.hk;
  const auto* cu_q = reinterpret_cast<const int32_t*>(a.cu_seqlens_q);
  const auto* cu_k = reinterpret_cast<const int32_t*>(a.cu_seqlens_k);
  const auto* region = reinterpret_cast<const int32_t*>(a.key_region);
  const auto* heads = reinterpret_cast<const int32_t*>(a.heads);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    region_mean_keys_kernel<T><<<static_cast<unsigned>(items), kMeanWarps * kWarpSize, 0, stream>>>(
        reinterpret_cast<const T*>(a.k), cu_k, region, kbar, a.num_regions, a.hk, a.head_dim,
        a.k_stride_t, a.k_stride_h);
  });
  KAWHI_CHECK_LAUNCH("cosine_alignment region_mean_keys_kernel");
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    cosine_rows_kernel<T><<<blocks_for(a.total_q, kRowsPerBlock), kRowsPerBlock * kWarpSize, 0,
                            stream>>>(
        reinterpret_cast<const T*>(a.q), cu_q, heads, kbar, out, a.total_q, a.num_seqs, a.hq,
        a.hk, a.head_dim, a.num_regions, a.num_heads, a.q_stride_t, a.q_stride_h,
        a.per_head ? 1 : 0);
  });
  KAWHI_CHECK_LAUNCH("cosine_alignment cosine_rows_kernel");
}

}  // namespace kawhi
