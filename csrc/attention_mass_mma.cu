// attention_mass on tensor cores (sm_80+; fp16/bf16 q and k, head dim a multiple of 16 up to
// 256, fp32 accumulation), in the structure of FlashAttention-2's forward pass:
//
//   * a CTA of 4 warps serves one (row block, slot group): the output slots of one KV head
//     (GQA: their query heads share every K tile the CTA loads). With slots_per_cta = 4 each
//     warp takes one slot and the block's 16 rows; with 2 (or 1) slots, 2 (or 4) warps per slot
//     take 16-row sub-blocks of a 32- (or 64-) row block. Either way the CTA's M is 64.
//   * Q fragments are loaded once into registers (A operand of mma.sync m16n8k16).
//   * K tiles of 64 keys stream through a 2-stage shared-memory ring with cp.async (16-byte
//     chunks, zero-filled beyond the sequence), rows XOR-swizzled in 16-byte chunks so that
//     ldmatrix.x4 reads are free of bank conflicts; S = Q K^T with ldmatrix-fed mma.sync.
//   * pass 1 (skipped when lse is given): online softmax in the accumulator layout: row max and
//     sum across the 4 lanes of a quad (two xor shuffles), base-2 exponentials;
//   * pass 2: p = min(exp(s - lse), 1) for visible keys, added to out[row or segment, slot,
//     region] with fp32 atomics (two adjacent keys of one region are summed first). Key tiles
//     without a region key are skipped (a per-CTA tile bitmap built from key_region), and tiles
//     beyond the last visible key of the block's last row are never visited (bottom-right
//     causal tile skipping).
// The index math (fragment <-> row/col, swizzle, visibility, warp assignment) is in
// mma_layout.h and tested on the host. Deterministic segment sums, fp32 inputs and head dims
// that are not multiples of 16 stay on the warp-per-row kernel (attention_mass.cu); the Python
// wrapper chooses (kawhi_kernels/cuda/attention_mass.py: tensor_core_slots).
#include <cmath>

#include "common.cuh"
#include "mma_layout.h"
#include "ops.h"

namespace kawhi {
namespace {

using namespace mma;

constexpr int kThreads = kWarps * kWarpThreads;
constexpr float kLog2e = 1.4426950408889634f;

struct MmaParams {
  const void* q;
  const void* k;
  const int32_t* cu_q;
  const int32_t* cu_k;
  const int32_t* key_region;
  const int32_t* heads;
  const int32_t* row_blocks;
  const int32_t* slot_groups;
  const float* lse;
  float* out;
  int64_t hq, hk, head_dim, num_seqs, num_regions, num_heads, num_targets;
  int64_t q_stride_t, q_stride_h, k_stride_t, k_stride_h, lse_stride_h, lse_stride_t;
  float scale_log2;  // softmax_scale * log2(e): scores in base 2
  int causal;
  int segmented;
  int slots_per_cta;
};

// ------------------------------------------------------------------ PTX wrappers (sm_80+)

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(const void* smem, uint32_t (&r)[4]) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------ the kernel

template <typename T, int kMaxD>
struct SharedLayout {
  static constexpr int kRowHalves = kMaxD;  // K rows padded to kMaxD (swizzle groups of 8)
  static constexpr int kStageHalves = kTileKeys * kRowHalves;
  static constexpr size_t kKBytes = sizeof(T) * kStages * kStageHalves;
  static constexpr size_t kRegionBytes = sizeof(int32_t) * kStages * kTileKeys;
  static constexpr size_t kBytes = kKBytes + kRegionBytes + kMaxFlagTiles;
  static_assert(sizeof(T) == 2 && kBytes == static_cast<size_t>(shared_bytes(kMaxD)),
                "mma_layout.h shared_bytes() must describe this layout");
};

// Issue the cp.async copies of K tile `tile` into ring stage `stage` (all threads), and the tile's
// region ids (plain loads: visible after the next __syncthreads).
template <typename T, int kMaxD>
__device__ __forceinline__ void load_k_tile(const MmaParams& p, const T* keys,
                                            const int32_t* region, int64_t lk, int64_t tile,
                                            T* smem_k, int32_t* smem_region, int stage) {
  using L = SharedLayout<T, kMaxD>;
  const int chunks = static_cast<int>(p.head_dim) / kChunkHalves;
  const int64_t key0 = tile * kTileKeys;
  T* dst_stage = smem_k + stage * L::kStageHalves;
  for (int idx = threadIdx.x; idx < kTileKeys * chunks; idx += kThreads) {
    const int key = idx / chunks;
    const int chunk = idx % chunks;
    const bool inside = key0 + key < lk;
    // Outside the sequence: zero-fill (source size 0 reads nothing; the address stays valid).
    const T* src = keys + (inside ? (key0 + key) * p.k_stride_t + chunk * kChunkHalves : 0);
    T* dst = dst_stage + key * L::kRowHalves + swizzle_chunk(key, chunk) * kChunkHalves;
    cp_async_16(dst, src, inside ? 16 : 0);
  }
  if (threadIdx.x < kTileKeys) {
    const int64_t j = key0 + threadIdx.x;
    smem_region[stage * kTileKeys + threadIdx.x] = j < lk ? region[j] : -1;
  }
}

// S (16 rows x 64 keys of this warp) of the tile in `stage`, in the accumulator layout.
template <typename T, int kMaxD>
__device__ __forceinline__ void tile_scores(const uint32_t (&qa)[kMaxD / 16][4], const T* smem_k,
                                            int stage, int k_steps, int lane,
                                            float (&acc)[kTileKeys / 8][4]) {
  using L = SharedLayout<T, kMaxD>;
#pragma unroll
  for (int nt = 0; nt < kTileKeys / 8; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
  const T* base = smem_k + stage * L::kStageHalves;
  const RowCol src = ldmatrix_k_source(lane);
#pragma unroll
  for (int kc = 0; kc < kMaxD / 16; ++kc) {
    if (kc < k_steps) {
#pragma unroll
      for (int np = 0; np < kTileKeys / 16; ++np) {
        const int key = np * 16 + src.row;
        const int chunk = kc * 2 + src.col;
        uint32_t b[4];
        ldmatrix_x4(base + key * L::kRowHalves + swizzle_chunk(key, chunk) * kChunkHalves, b);
        mma_16816<T>(acc[2 * np], qa[kc], b[0], b[1]);
        mma_16816<T>(acc[2 * np + 1], qa[kc], b[2], b[3]);
      }
    }
  }
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFullMask, v, 1));
  return fmaxf(v, __shfl_xor_sync(kFullMask, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  return v + __shfl_xor_sync(kFullMask, v, 2);
}

__device__ __forceinline__ void add_mass(float* row_out, int region, float value) {
  atomicAdd(row_out + region, value);
}

template <typename T, int kMaxD>
__global__ void __launch_bounds__(kThreads, 2) attention_mass_mma_kernel(MmaParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = SharedLayout<T, kMaxD>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* smem_k = reinterpret_cast<T*>(shared_raw);
  int32_t* smem_region = reinterpret_cast<int32_t*>(shared_raw + L::kKBytes);
  unsigned char* tile_flag = shared_raw + L::kKBytes + L::kRegionBytes;

  const int warp = threadIdx.x / kWarpThreads;
  const int lane = threadIdx.x % kWarpThreads;
  const int spc = p.slots_per_cta;
  // CTA-uniform values first: every early return below is taken by the whole CTA.
  const int32_t* entry = p.row_blocks + static_cast<int64_t>(blockIdx.x) * 4;
  const int64_t seq = entry[0];
  const int64_t row0 = entry[1];
  const int64_t nrows = min(static_cast<int64_t>(entry[2]), static_cast<int64_t>(block_rows_for(spc)));
  const int64_t segment = entry[3];
  const int32_t* group = p.slot_groups + static_cast<int64_t>(blockIdx.y) * spc;
  const int64_t group_size = p.hq / p.hk;
  if (seq < 0 || seq >= p.num_seqs || nrows <= 0 || group[0] < 0 || group[0] >= p.num_heads)
    return;
  const int64_t kv = p.heads[group[0]] / group_size;
  if (kv < 0 || kv >= p.hk) return;
  const int64_t q_start = p.cu_q[seq];
  const int64_t lq = p.cu_q[seq + 1] - q_start;
  const int64_t k_start = p.cu_k[seq];
  const int64_t lk = p.cu_k[seq + 1] - k_start;
  const int64_t first_local = row0 - q_start;
  const int64_t n_tiles = key_tiles_needed(first_local, nrows, lq, lk, p.causal != 0);
  if (n_tiles <= 0) return;
  const int64_t out_rows_segment = p.segmented ? segment : -1;
  if (p.segmented && (segment < 0 || segment >= p.num_targets)) return;

  // This warp's slot and 16-row sub-block.
  const RowCol who = warp_assignment(warp, spc);
  const int slot = group[who.row];
  const int64_t head = (slot >= 0 && slot < p.num_heads) ? p.heads[slot] : -1;
  const bool active = head >= 0 && head < p.hq && head / group_size == kv;
  const int g = lane / 4;
  // Local rows (in the sequence) of this thread's two accumulator rows, and their key limits.
  int64_t block_row[2], limit[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    block_row[h] = who.col * kWarpRows + g + h * 8;
    const bool row_ok = active && block_row[h] < nrows;
    limit[h] = row_ok ? visible_keys(first_local + block_row[h], lq, lk, p.causal != 0) : 0;
  }

  // Q fragments (A operand), zero for rows outside the block and columns beyond head_dim.
  const int k_steps = static_cast<int>(p.head_dim) / 16;
  const T* q = static_cast<const T*>(p.q);
  uint32_t qa[kMaxD / 16][4];
#pragma unroll
  for (int kc = 0; kc < kMaxD / 16; ++kc) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const RowCol rc = a_coord(lane, r, 0);
      const int64_t brow = who.col * kWarpRows + rc.row;
      uint32_t v = 0;
      if (kc < k_steps && active && brow < nrows) {
        const T* src = q + (row0 + brow) * p.q_stride_t + head * p.q_stride_h + kc * 16 + rc.col;
        v = *reinterpret_cast<const uint32_t*>(src);
      }
      qa[kc][r] = v;
    }
  }

  const T* keys = static_cast<const T*>(p.k) + k_start * p.k_stride_t + kv * p.k_stride_h;
  const int32_t* region = p.key_region + k_start;
  float acc[kTileKeys / 8][4];

  // ---------------------------------------------------------------- pass 1: row normalisers
  float lse2[2];  // base-2 log-sum-exp of each accumulator row; -inf: row contributes nothing
  if (p.lse != nullptr) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v = -INFINITY;
      if (limit[h] > 0) {
        v = p.lse[head * p.lse_stride_h + (row0 + block_row[h]) * p.lse_stride_t];
        v = isfinite(v) ? v * kLog2e : -INFINITY;  // non-finite lse: the row gives 0
      }
      lse2[h] = v;
    }
  } else {
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.0f, 0.0f};  // this thread's share of the row sums, scaled to m
    load_k_tile<T, kMaxD>(p, keys, region, lk, 0, smem_k, smem_region, 0);
    cp_async_commit();
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int stage = static_cast<int>(t % kStages);
      if (t + 1 < n_tiles) {
        load_k_tile<T, kMaxD>(p, keys, region, lk, t + 1, smem_k, smem_region, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      if (active) {
        tile_scores<T, kMaxD>(qa, smem_k, stage, k_steps, lane, acc);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float tile_max = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kTileKeys / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int64_t key = t * kTileKeys + nt * 8 + c_coord(lane, h * 2 + e).col;
              const float s = key < limit[h] ? acc[nt][h * 2 + e] * p.scale_log2 : -INFINITY;
              acc[nt][h * 2 + e] = s;
              tile_max = fmaxf(tile_max, s);
            }
          const float m_new = fmaxf(m[h], quad_max(tile_max));
          if (m_new == -INFINITY) continue;  // nothing visible yet in this row
          float sum = 0.0f;
#pragma unroll
          for (int nt = 0; nt < kTileKeys / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) sum += exp2f(acc[nt][h * 2 + e] - m_new);
          l[h] = l[h] * exp2f(m[h] - m_new) + sum;
          m[h] = m_new;
        }
      }
      __syncthreads();  // the stage read here is refilled by the next iteration's prefetch
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float total = quad_sum(l[h]);
      lse2[h] = total > 0.0f ? m[h] + log2f(total) : -INFINITY;
    }
  }

  // ---------------------------------------------------------------- region-bearing tiles
  for (int i = threadIdx.x; i < kMaxFlagTiles; i += kThreads) tile_flag[i] = 0;
  __syncthreads();
  const int64_t flagged_keys = min(n_tiles, static_cast<int64_t>(kMaxFlagTiles)) * kTileKeys;
  for (int64_t j = threadIdx.x; j < flagged_keys; j += kThreads) {
    const int rg = j < lk ? region[j] : -1;
    if (rg >= 0 && rg < p.num_regions) tile_flag[j / kTileKeys] = 1;  // benign same-value race
  }
  __syncthreads();
  auto next_tile = [&](int64_t t) {
    while (t < n_tiles && t < kMaxFlagTiles && !tile_flag[t]) ++t;
    return t;
  };

  // ---------------------------------------------------------------- pass 2: region mass
  float* row_out[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t target = p.segmented ? out_rows_segment : row0 + block_row[h];
    const bool ok = limit[h] > 0 && lse2[h] != -INFINITY && target >= 0 && target < p.num_targets;
    if (!ok) limit[h] = 0;
    row_out[h] = ok ? p.out + (target * p.num_heads + slot) * p.num_regions : nullptr;
  }
  int64_t t = next_tile(0);
  int stage = 0;
  if (t < n_tiles) {
    load_k_tile<T, kMaxD>(p, keys, region, lk, t, smem_k, smem_region, stage);
    cp_async_commit();
  }
  while (t < n_tiles) {
    const int64_t t_next = next_tile(t + 1);
    if (t_next < n_tiles) {
      load_k_tile<T, kMaxD>(p, keys, region, lk, t_next, smem_k, smem_region, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (active) {
      tile_scores<T, kMaxD>(qa, smem_k, stage, k_steps, lane, acc);
      const int32_t* tile_region = smem_region + stage * kTileKeys;
#pragma unroll
      for (int nt = 0; nt < kTileKeys / 8; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int col = nt * 8 + c_coord(lane, h * 2).col;  // even: keys col, col + 1
          const int64_t key = t * kTileKeys + col;
          float prob[2];
          int rg[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            rg[e] = tile_region[col + e];
            const bool take = key + e < limit[h] && rg[e] >= 0 && rg[e] < p.num_regions;
            prob[e] = take ? fminf(exp2f(acc[nt][h * 2 + e] * p.scale_log2 - lse2[h]), 1.0f)
                           : 0.0f;  // capped at 1 as on every backend
            if (!take) rg[e] = -1;
          }
          if (rg[0] >= 0 && rg[0] == rg[1]) {
            add_mass(row_out[h], rg[0], prob[0] + prob[1]);
          } else {
            if (rg[0] >= 0) add_mass(row_out[h], rg[0], prob[0]);
            if (rg[1] >= 0) add_mass(row_out[h], rg[1], prob[1]);
          }
        }
    }
    __syncthreads();
    t = t_next;
    stage ^= 1;
  }
#else
  __trap();  // built without sm_80 code: the host refuses such devices before launching
#endif
}

template <typename T, int kMaxD>
void launch_for(const MmaParams& p, dim3 grid, cudaStream_t stream) {
  constexpr size_t bytes = SharedLayout<T, kMaxD>::kBytes;
  KAWHI_CUDA_CHECK(cudaFuncSetAttribute(attention_mass_mma_kernel<T, kMaxD>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)),
                   "attention_mass_mma_kernel (shared memory size)");
  attention_mass_mma_kernel<T, kMaxD><<<grid, kThreads, bytes, stream>>>(p);
  KAWHI_CHECK_LAUNCH("attention_mass_mma_kernel");
}

}  // namespace

// Called by launch_attention_mass (validated arguments, output zeroed) when slots_per_cta > 0.
void launch_attention_mass_mma(const AttentionMassArgs& a, cudaStream_t stream) {
  int major = 0;
  KAWHI_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a.device),
                   "attention_mass_mma (device capability)");
  if (major < 8)
    throw std::invalid_argument(
        "slots_per_cta: the tensor-core attention_mass kernel needs compute capability >= 8.0; "
        "use slots_per_cta = 0 on this device");
  MmaParams p{};
  p.q = reinterpret_cast<const void*>(a.q);
  p.k = reinterpret_cast<const void*>(a.k);
  p.cu_q = reinterpret_cast<const int32_t*>(a.cu_seqlens_q);
  p.cu_k = reinterpret_cast<const int32_t*>(a.cu_seqlens_k);
  p.key_region = reinterpret_cast<const int32_t*>(a.key_region);
  p.heads = reinterpret_cast<const int32_t*>(a.heads);
  p.row_blocks = reinterpret_cast<const int32_t*>(a.row_blocks);
  p.slot_groups = reinterpret_cast<const int32_t*>(a.slot_groups);
  p.lse = reinterpret_cast<const float*>(a.lse);
  p.out = reinterpret_cast<float*>(a.out);
  p.hq = a.hq;
  p.hk = a.hk;
  p.head_dim = a.head_dim;
  p.num_seqs = a.num_seqs;
  p.num_regions = a.num_regions;
  p.num_heads = a.num_heads;
  p.num_targets = a.segmented ? a.num_segments : a.total_q;
  p.q_stride_t = a.q_stride_t;
  p.q_stride_h = a.q_stride_h;
  p.k_stride_t = a.k_stride_t;
  p.k_stride_h = a.k_stride_h;
  p.lse_stride_h = a.lse_stride_h;
  p.lse_stride_t = a.lse_stride_t;
  p.scale_log2 = static_cast<float>(a.softmax_scale) * kLog2e;
  p.causal = a.causal ? 1 : 0;
  p.segmented = a.segmented ? 1 : 0;
  p.slots_per_cta = static_cast<int>(a.slots_per_cta);
  const dim3 grid(static_cast<unsigned>(a.num_row_blocks), static_cast<unsigned>(a.num_slot_groups));
  const bool wide = a.head_dim > 128;
  if (a.dtype == kFloat16) {
    wide ? launch_for<__half, 256>(p, grid, stream) : launch_for<__half, 128>(p, grid, stream);
  } else {
    wide ? launch_for<__nv_bfloat16, 256>(p, grid, stream)
         : launch_for<__nv_bfloat16, 128>(p, grid, stream);
  }
}

}  // namespace kawhi
