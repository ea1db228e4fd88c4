// cosine_alignment: mean cosine of each query row to the keys of each region of its sequence,
// in factorised form (see ops.h). Two kernels, no atomics (bit-reproducible).
//
// Row layout ("chunked"): a row of head_dim elements is cut into 16-byte chunks of V elements
// (V = 4 fp32, 8 fp16/bf16). A group of G lanes (G a power of two, G * kChunks >= chunks) holds
// one row, lane `sub` of the group chunks sub, sub + G, ...; a warp holds 32 / G rows at once,
// so short rows (D = 64 in 16-bit: 8 chunks) still fill every lane of a load instruction. Rows
// whose base, strides and head dim are multiples of a chunk are read with 16-byte loads (the
// kVector instantiations, LDG.E.128); any other layout with bounds-checked scalar loads of the
// same chunks. Norms and dot products reduce over the G lanes of a group (xor shuffles).
//
// region_mean_keys_kernel: one block of kMeanWarps warps per (sequence, region, KV head). Warp
//   w scans the sequence's keys in chunks of 32 (chunks w, w + kMeanWarps, ...), finds the keys
//   of its region with a ballot and hands them, in key order, to its lane groups (group g takes
//   the g-th remaining key); the groups' unit-vector sums are added with a butterfly, the
//   warps' in warp order, and divided by the key count.
// cosine_rows_kernel: one warp per query row. Its selected heads are taken 32 / G at a time
//   (each q element read once), unit-normalised, and dotted with their KV head's mean key for
//   every region: per-head values from each group, or, for the mean, the sum over all the
//   warp's heads in one warp reduction, accumulated over the passes and divided at the end.
#include <cmath>

#include "common.cuh"
#include "ops.h"
#include "vec_load.cuh"

namespace kawhi {
namespace {

constexpr int kMeanWarps = 8;
constexpr int kRowsPerBlock = 4;  // warps (rows) per block of cosine_rows_kernel

// Chunks of a row one lane holds: kValuesPerLane values per lane as in the other kernels.
template <typename T>
struct Chunked {
  static constexpr int V = VecTraits<T>::kElems;
  static constexpr int kChunks = kValuesPerLane / V;
};

// Sum over the `group` (a power of two) lanes of each aligned lane group; all lanes take part
// and every lane of a group ends with the bitwise same total.
__device__ __forceinline__ float group_sum(float v, int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// The chunks of `row` this lane holds (zero where absent or beyond head_dim, or if !live).
template <typename T, bool kVector>
__device__ __forceinline__ void load_row_chunks(
    const T* row, int head_dim, int sub, int group, bool live,
    float (&v)[Chunked<T>::kChunks][Chunked<T>::V]) {
  constexpr int V = Chunked<T>::V;
#pragma unroll
  for (int t = 0; t < Chunked<T>::kChunks; ++t) {
    const int first = (sub + t * group) * V;
    if (live && first < head_dim) {
      load_chunk<T, kVector>(row + first, head_dim - first, v[t]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) v[t][j] = 0.0f;
    }
  }
}

// Unit vector of a group-held row in place (x / |x|; a zero vector stays zero).
template <int C, int V>
__device__ __forceinline__ void normalise(float (&v)[C][V], int group) {
  float sq = 0.0f;
#pragma unroll
  for (int t = 0; t < C; ++t)
#pragma unroll
    for (int j = 0; j < V; ++j) sq = fmaf(v[t][j], v[t][j], sq);
  const float norm = sqrtf(group_sum(sq, group));
#pragma unroll
  for (int t = 0; t < C; ++t)
#pragma unroll
    for (int j = 0; j < V; ++j) v[t][j] = norm > 0.0f ? v[t][j] / norm : 0.0f;
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kMeanWarps * kWarpSize)
region_mean_keys_kernel(const T* k, const int32_t* cu_k, const int32_t* key_region, float* kbar,
                        int64_t num_regions, int64_t hk, int head_dim, int64_t k_stride_t,
                        int64_t k_stride_h, int group) {
  constexpr int V = Chunked<T>::V;
  constexpr int C = Chunked<T>::kChunks;
  __shared__ float partial[kMeanWarps][kMaxHeadDim];
  __shared__ int counts[kMeanWarps];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int sub = lane & (group - 1);
  const int grp = lane / group;
  const int per_pass = kWarpSize / group;  // keys the warp normalises at once
  const int64_t item = blockIdx.x;  // (seq * num_regions + region) * hk + kv
  const int64_t kv = item % hk;
  const int64_t region = (item / hk) % num_regions;
  const int64_t seq = item / (hk * num_regions);
  const int64_t k_start = cu_k[seq];
  const int64_t lk = cu_k[seq + 1] - k_start;
  const T* keys = k + k_start * k_stride_t + kv * k_stride_h;

  float acc[C][V];
#pragma unroll
  for (int t = 0; t < C; ++t)
#pragma unroll
    for (int j = 0; j < V; ++j) acc[t][j] = 0.0f;
  int count = 0;
  for (int64_t chunk = static_cast<int64_t>(warp) * kWarpSize; chunk < lk;
       chunk += static_cast<int64_t>(kMeanWarps) * kWarpSize) {
    const int64_t mine = chunk + lane;
    const bool match = mine < lk && key_region[k_start + mine] == region;
    unsigned hits = __ballot_sync(kFullMask, match);
    count += __popc(hits);
    while (hits != 0u) {  // the chunk's matching keys in ascending order, per_pass at a time
      unsigned left = hits;
      for (int g = 0; g < grp; ++g) left &= left - 1u;  // drop the earlier groups' keys
      const bool live = left != 0u;
      const int bit = live ? __ffs(left) - 1 : 0;
      float v[C][V];
      load_row_chunks<T, kVector>(keys + (chunk + bit) * k_stride_t, head_dim, sub, group, live,
                                  v);
      normalise(v, group);
#pragma unroll
      for (int t = 0; t < C; ++t)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[t][j] += v[t][j];
      for (int g = 0; g < per_pass; ++g) hits &= hits - 1u;
    }
  }
  // Add the groups' sums (lanes sub of every group hold the same chunks).
#pragma unroll
  for (int t = 0; t < C; ++t)
#pragma unroll
    for (int j = 0; j < V; ++j)
      for (int offset = kWarpSize >> 1; offset >= group; offset >>= 1)
        acc[t][j] += __shfl_xor_sync(kFullMask, acc[t][j], offset);
  if (grp == 0) {
#pragma unroll
    for (int t = 0; t < C; ++t)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int c = (sub + t * group) * V + j;
        if (c < head_dim) partial[warp][c] = acc[t][j];
      }
  }
  if (lane == 0) counts[warp] = count;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < kMeanWarps; ++w) total += counts[w];
  for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
    float sum = 0.0f;
    for (int w = 0; w < kMeanWarps; ++w) sum += partial[w][c];
    kbar[item * head_dim + c] = total > 0 ? sum / static_cast<float>(total) : 0.0f;
  }
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kRowsPerBlock * kWarpSize)
cosine_rows_kernel(const T* q, const int32_t* cu_q, const int32_t* heads, const float* kbar,
                   float* out, int64_t total_q, int64_t num_seqs, int64_t hq, int64_t hk,
                   int head_dim, int64_t num_regions, int64_t num_heads, int64_t q_stride_t,
                   int64_t q_stride_h, int per_head, int group) {
  constexpr int V = Chunked<T>::V;
  constexpr int C = Chunked<T>::kChunks;
  const int lane = threadIdx.x % kWarpSize;
  const int sub = lane & (group - 1);
  const int grp = lane / group;
  const int per_pass = kWarpSize / group;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= total_q) return;  // whole warps leave together
  // Sequence of the row: the last b with cu_q[b] <= row (rows only exist in non-empty sequences).
  int64_t lo = 0, hi = num_seqs;  // invariant: cu_q[lo] <= row < cu_q[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (cu_q[mid] <= row) lo = mid; else hi = mid;
  }
  const int64_t seq = lo;
  const int64_t kv_group = hq / hk;
  const int64_t region_stride = hk * head_dim;  // kbar [num_seqs, num_regions, hk, head_dim]
  for (int64_t pass = 0; pass < num_heads; pass += per_pass) {
    const int64_t slot = pass + grp;
    const int64_t head = slot < num_heads ? heads[slot] : -1;
    const bool live = head >= 0 && head < hq;  // guard; the Python wrapper validates heads
    float v[C][V];
    load_row_chunks<T, kVector>(q + row * q_stride_t + (live ? head : 0) * q_stride_h, head_dim,
                                sub, group, live, v);
    normalise(v, group);
    const float* means =
        kbar + (seq * num_regions * hk + (live ? head / kv_group : 0)) * head_dim;
    for (int64_t r = 0; r < num_regions; ++r) {
      const float* mean = means + r * region_stride;
      float dot = 0.0f;
#pragma unroll
      for (int t = 0; t < C; ++t) {
        const int first = (sub + t * group) * V;
        if (live && first < head_dim) {
          float m[V];
          load_float_chunk<V, kVector>(mean + first, head_dim - first, m);
#pragma unroll
          for (int j = 0; j < V; ++j) dot = fmaf(v[t][j], m[j], dot);
        }
      }
      if (per_head) {
        const float c = group_sum(dot, group);
        if (sub == 0 && live) out[(row * num_heads + slot) * num_regions + r] = c;
      } else {
        const float c = warp_sum(dot);  // this pass's heads together
        if (lane == 0) out[row * num_regions + r] += c;  // this warp owns the row
      }
    }
  }
  if (!per_head && lane == 0) {
    for (int64_t r = 0; r < num_regions; ++r)
      out[row * num_regions + r] /= static_cast<float>(num_heads);
  }
}

// Lanes per row: the least power of two whose lanes hold every chunk of a head_dim row.
template <typename T>
int group_lanes(int64_t head_dim) {
  const int64_t chunks = (head_dim + Chunked<T>::V - 1) / Chunked<T>::V;
  const int64_t per_lane = Chunked<T>::kChunks;
  int group = 1;
  while (group * per_lane < chunks) group *= 2;
  return group;
}

// 16-byte loads are possible for rows at p with these strides (elements) and head dim.
template <typename T>
bool vector_rows(uintptr_t p, int64_t stride_t, int64_t stride_h, int64_t head_dim) {
  constexpr int64_t V = Chunked<T>::V;
  return p % kVecBytes == 0 && stride_t % V == 0 && stride_h % V == 0 && head_dim % V == 0;
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
  const int d = static_cast<int>(a.head_dim);
  const bool kbar_vec = a.kbar % kVecBytes == 0;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int group = group_lanes<T>(a.head_dim);
    const auto* k = reinterpret_cast<const T*>(a.k);
    auto mean_keys = vector_rows<T>(a.k, a.k_stride_t, a.k_stride_h, a.head_dim)
                         ? region_mean_keys_kernel<T, true>
                         : region_mean_keys_kernel<T, false>;
    mean_keys<<<static_cast<unsigned>(items), kMeanWarps * kWarpSize, 0, stream>>>(
        k, cu_k, region, kbar, a.num_regions, a.hk, d, a.k_stride_t, a.k_stride_h, group);
  });
  KAWHI_CHECK_LAUNCH("cosine_alignment region_mean_keys_kernel");
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int group = group_lanes<T>(a.head_dim);
    auto rows = kbar_vec && vector_rows<T>(a.q, a.q_stride_t, a.q_stride_h, a.head_dim)
                    ? cosine_rows_kernel<T, true>
                    : cosine_rows_kernel<T, false>;
    rows<<<blocks_for(a.total_q, kRowsPerBlock), kRowsPerBlock * kWarpSize, 0, stream>>>(
        reinterpret_cast<const T*>(a.q), cu_q, heads, kbar, out, a.total_q, a.num_seqs, a.hq,
        a.hk, d, a.num_regions, a.num_heads, a.q_stride_t, a.q_stride_h, a.per_head ? 1 : 0,
        group);
  });
  KAWHI_CHECK_LAUNCH("cosine_alignment cosine_rows_kernel");
}

}  // namespace kawhi
