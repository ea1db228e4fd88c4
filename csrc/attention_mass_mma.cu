// attention_mass on tensor cores (sm_80+; fp16/bf16 q and k, head dim a multiple of 16 up to
// 256, fp32 accumulation), in the structure of FlashAttention-2's forward pass:
//
//   * a CTA of 4 warps serves one (row block, slot group): the output slots of one KV head
//     (GQA: their query heads share every K tile the CTA loads). With slots_per_cta = 4 each
//     warp takes one slot and the block's 16 rows; with 2 (or 1) slots, 2 (or 4) warps per slot
//     take 16-row sub-blocks of a 32- (or 64-) row block. Either way the CTA's M is 64.
//   * Q fragments are loaded once into registers (A operand of mma.sync m16n8k16).
//   * K tiles of 64 keys stream through a kStages-deep shared-memory ring (KRing, pipelined by
//     for_each_tile) with cp.async (16-byte chunks, zero-filled beyond the sequence), rows
//     XOR-swizzled in 16-byte chunks so that ldmatrix.x4 reads are free of bank conflicts;
//     S = Q K^T with ldmatrix-fed mma.sync.
//   * pass 1 (skipped when lse is given): online softmax in the accumulator layout: row max and
//     sum across the 4 lanes of a quad (two xor shuffles), base-2 exponentials;
//   * pass 2: p = min(exp(s - lse), 1) for visible keys, in the accumulator registers, becomes
//     the A operand of a second mma.sync (fp16 hi + lo parts of p * 2^15: about 22 significant
//     bits) against a one-hot B built in registers from per-key columns staged with the tile:
//       - coarse (R <= 64, template kCoarse): column = region id; the fp32 [16 x 64]
//         accumulator sums the whole pass and is written once at the end;
//       - scatter (R > 64): column = first key of the tile with the same region, so the
//         accumulator holds the tile's mass per region; it is flushed after every tile.
//     Flushing: per-row outputs are owned by one lane per element (plain stores / adds,
//     ordered across tiles by the CTA barrier, bit-reproducible); segment outputs are summed
//     over the warp's rows (shuffles), then over the warps of a slot through shared-memory
//     column sums in a fixed order, and added with fp32 atomics, or with deterministic=True
//     written to the CTA's own partial row (one writer; sum_partials_kernel adds a segment's
//     rows in a fixed order afterwards).
//     Key tiles without a region key are skipped (a per-CTA tile bitmap built from
//     key_region), and tiles beyond the last visible key of the block's last row are never
//     visited (bottom-right causal tile skipping).
// The index math (fragment <-> row/col, P -> A repacking, one-hot B, swizzle, visibility, warp
// assignment) is in mma_layout.h and tested on the host; fp32 inputs and head dims that are
// not multiples of 16 stay on the warp-per-row kernel (attention_mass.cu); the Python wrapper
// chooses (kawhi_kernels/cuda/attention_mass.py: tensor_core_slots).
#include <cmath>

#include "attention_mass_params.h"
#include "common.cuh"
#include "mma_layout.h"
#include "ops.h"

namespace kawhi {
namespace {

using namespace mma;

constexpr int kThreads = kWarps * kWarpThreads;
constexpr float kLog2e = 1.4426950408889634f;

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

__device__ __forceinline__ uint32_t half2_bits(__half2 h) {
  return *reinterpret_cast<uint32_t*>(&h);
}

// ------------------------------------------------------------------ shared memory and the ring

template <int kMaxD>
struct SharedLayout {
  static constexpr int kRowHalves = kMaxD;  // K rows padded to kMaxD (swizzle groups of 8)
  static constexpr int kStageHalves = kTileKeys * kRowHalves;
  static constexpr size_t kKBytes = 2 * kStages * kStageHalves;
  static constexpr size_t kRegionOffset = kKBytes;  // int32 [kStages][kTileKeys]
  static constexpr size_t kColSumOffset = kRegionOffset + 4 * kStages * kTileKeys;
  static constexpr size_t kColumnOffset = kColSumOffset + 4 * kWarps * kTileKeys;  // int8
  static constexpr size_t kFlagOffset = kColumnOffset + kStages * kTileKeys;
  static constexpr size_t kBytes = kFlagOffset + kMaxFlagTiles;
  static_assert(kBytes == static_cast<size_t>(shared_bytes(kMaxD)),
                "mma_layout.h shared_bytes() must describe this layout");
};

enum Columns : int { kNoColumns = 0, kRegionColumns = 1, kFirstKeyColumns = 2 };

// Scatter column of `key` (threadIdx.x < kTileKeys: whole warps 0 and 1): the first key of the
// tile with the same region rg (-1 for none), as mma::scatter_column_host. Warp 0 (keys 0..31)
// needs only its own lanes (__match_any_sync); warp 1 looks through warp 0's keys first.
__device__ __forceinline__ int scatter_column(int rg, int key, int other_half_rg) {
  const unsigned same = __match_any_sync(kFullMask, rg);
  int first = (key / kWarpThreads) * kWarpThreads + __ffs(same) - 1;
  if (key >= kWarpThreads) {  // warp-uniform
#pragma unroll 8
    for (int j = 0; j < kWarpThreads; ++j) {
      const int v = __shfl_sync(kFullMask, other_half_rg, j);
      if (v == rg && first >= kWarpThreads) first = j;
    }
  }
  return rg < 0 ? -1 : first;
}

// The K-tile ring: K rows (cp.async), and for pass 2 the tile's region ids and one-hot columns
// (plain shared stores: read after the next barrier of for_each_tile).
template <typename T, int kMaxD>
struct KRing {
  using L = SharedLayout<kMaxD>;
  const T* keys;
  const int32_t* region;
  int64_t lk, k_stride_t, num_regions;
  int chunks;
  unsigned char* smem;

  __device__ T* k_stage(int stage) const {
    return reinterpret_cast<T*>(smem) + stage * L::kStageHalves;
  }
  __device__ int32_t* region_stage(int stage) const {
    return reinterpret_cast<int32_t*>(smem + L::kRegionOffset) + stage * kTileKeys;
  }
  __device__ int8_t* column_stage(int stage) const {
    return reinterpret_cast<int8_t*>(smem + L::kColumnOffset) + stage * kTileKeys;
  }

  // All threads: issue the copies of tile `tile` into `stage` (the caller commits the group).
  __device__ void issue(int64_t tile, int stage, int columns) const {
    const int64_t key0 = tile * kTileKeys;
    T* dst_stage = k_stage(stage);
    for (int idx = threadIdx.x; idx < kTileKeys * chunks; idx += kThreads) {
      const int key = idx / chunks;
      const int chunk = idx % chunks;
      const bool inside = key0 + key < lk;
      // Outside the sequence: zero-fill (source size 0 reads nothing; the address stays valid).
      const T* src = keys + (inside ? (key0 + key) * k_stride_t + chunk * kChunkHalves : 0);
      T* dst = dst_stage + key * L::kRowHalves + swizzle_chunk(key, chunk) * kChunkHalves;
      cp_async_16(dst, src, inside ? 16 : 0);
    }
    if (columns != kNoColumns && threadIdx.x < kTileKeys) {  // whole warps 0 and 1
      const int key = threadIdx.x;
      const int rg = region_of(key0 + key);
      region_stage(stage)[key] = rg;
      int col = rg;
      if (columns == kFirstKeyColumns)
        col = scatter_column(rg, key, key >= kWarpThreads ? region_of(key0 + key - kWarpThreads) : rg);
      column_stage(stage)[key] = static_cast<int8_t>(col);
    }
  }

  __device__ int region_of(int64_t j) const {
    const int rg = j < lk ? region[j] : -1;
    return (rg >= 0 && rg < num_regions) ? rg : -1;
  }
};

// Run body(tile, stage) for tile = first, next(first + 1), ... < n_tiles, kStages - 1 tiles
// ahead in the ring. One barrier per tile: after it, the tile in `stage` has landed and every
// thread is done with the stage the refill overwrites (the one read in the previous step).
// Every thread calls this with the same arguments (CTA-uniform tile sequence).
template <typename Ring, typename Next, typename Body>
__device__ __forceinline__ void for_each_tile(const Ring& ring, int64_t first, int64_t n_tiles,
                                              int columns, Next next, Body body) {
  int64_t issue_t = first;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (issue_t < n_tiles) {
      ring.issue(issue_t, s, columns);
      issue_t = next(issue_t + 1);
    }
    cp_async_commit();  // empty groups keep the group count uniform
  }
  int stage = 0;
  for (int64_t t = first; t < n_tiles; t = next(t + 1)) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (issue_t < n_tiles) {
      ring.issue(issue_t, stage == 0 ? kStages - 1 : stage - 1, columns);
      issue_t = next(issue_t + 1);
    }
    cp_async_commit();
    body(t, stage);
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring may be reused
}

// ------------------------------------------------------------------ warp-level pieces

// S (16 rows x 64 keys of this warp) of the tile in `k_tile`, in the accumulator layout.
template <typename T, int kMaxD>
__device__ __forceinline__ void tile_scores(const uint32_t (&qa)[kMaxD / 16][4], const T* k_tile,
                                            int k_steps, int lane,
                                            float (&acc)[kTileKeys / 8][4]) {
  using L = SharedLayout<kMaxD>;
#pragma unroll
  for (int nt = 0; nt < kTileKeys / 8; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
  const RowCol src = ldmatrix_k_source(lane);
#pragma unroll
  for (int kc = 0; kc < kMaxD / 16; ++kc) {
    if (kc < k_steps) {
#pragma unroll
      for (int np = 0; np < kTileKeys / 16; ++np) {
        const int key = np * 16 + src.row;
        const int chunk = kc * 2 + src.col;
        uint32_t b[4];
        ldmatrix_x4(k_tile + key * L::kRowHalves + swizzle_chunk(key, chunk) * kChunkHalves, b);
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

// mass[rt] += P (16 x 64 keys, in acc, already scaled by kMassScale) x one-hot(columns) for
// region n-tiles rt < ntiles: the second MMA, fp16 hi and lo parts of P as two A operands.
__device__ __forceinline__ void mass_mma(const float (&acc)[kTileKeys / 8][4],
                                         const int8_t* columns, int lane, int ntiles,
                                         float (&mass)[kTileKeys / 8][4]) {
  constexpr uint32_t kOne = 0x3C00u;  // fp16 1.0
#pragma unroll
  for (int kc = 0; kc < kTileKeys / 16; ++kc) {
    uint32_t hi[4], lo[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const RowCol s = p_a_source(kc, r);
      const float x0 = acc[s.row][s.col];
      const float x1 = acc[s.row][s.col + 1];
      const __half2 h = __floats2half2_rn(x0, x1);  // low half: the lower column
      const float2 back = __half22float2(h);
      hi[r] = half2_bits(h);
      lo[r] = half2_bits(__floats2half2_rn(x0 - back.x, x1 - back.y));
    }
    int col[2][2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) col[r][h] = columns[one_hot_key(lane, kc, r, h)];
#pragma unroll
    for (int rt = 0; rt < kTileKeys / 8; ++rt) {
      if (rt < ntiles) {
        const int n = one_hot_col(lane, rt);
        const uint32_t b0 = (col[0][0] == n ? kOne : 0u) | (col[0][1] == n ? kOne << 16 : 0u);
        const uint32_t b1 = (col[1][0] == n ? kOne : 0u) | (col[1][1] == n ? kOne << 16 : 0u);
        mma_16816<__half>(mass[rt], hi, b0, b1);
        mma_16816<__half>(mass[rt], lo, b0, b1);
      }
    }
  }
}

// Column sums of the warp's mass over its 16 rows into colsum[0..63] (this warp's row of the
// shared column-sum table). Whole warp.
__device__ __forceinline__ void warp_column_sums(const float (&mass)[kTileKeys / 8][4], int lane,
                                                 int ntiles, float* colsum) {
#pragma unroll
  for (int rt = 0; rt < kTileKeys / 8; ++rt) {
    if (rt < ntiles) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = mass[rt][e] + mass[rt][2 + e];  // rows g and g + 8
        v += __shfl_xor_sync(kFullMask, v, 4);
        v += __shfl_xor_sync(kFullMask, v, 8);
        v += __shfl_xor_sync(kFullMask, v, 16);
        if (lane < 4) colsum[c_coord(lane, e).col + rt * 8] = v;
      }
    }
  }
}

// ------------------------------------------------------------------ the kernel

template <typename T, int kMaxD, bool kCoarse>
__global__ void __launch_bounds__(kThreads, 2) attention_mass_mma_kernel(MassKernelParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = SharedLayout<kMaxD>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  float* colsum = reinterpret_cast<float*>(shared_raw + L::kColSumOffset);
  unsigned char* tile_flag = shared_raw + L::kFlagOffset;

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
  const bool per_row = p.out_mode == kOutRows;
  // Segment outputs: row `segment` of out (atomics) or this CTA's partial row.
  const int64_t seg_target = p.out_mode == kOutPartial ? static_cast<int64_t>(blockIdx.x) : segment;
  if (!per_row && (seg_target < 0 || seg_target >= p.num_targets)) return;

  // This warp's slot and 16-row sub-block.
  const RowCol who = warp_assignment(warp, spc);
  const int slot = group[who.row];
  const int64_t head = (slot >= 0 && slot < p.num_heads) ? p.heads[slot] : -1;
  const bool active = head >= 0 && head < p.hq && head / group_size == kv;  // warp-uniform
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

  const KRing<T, kMaxD> ring{static_cast<const T*>(p.k) + k_start * p.k_stride_t + kv * p.k_stride_h,
                             p.key_region + k_start, lk, p.k_stride_t, p.num_regions,
                             static_cast<int>(p.head_dim) / kChunkHalves, shared_raw};
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
    for_each_tile(ring, 0, n_tiles, kNoColumns, [](int64_t t) { return t; },
                  [&](int64_t t, int stage) {
      if (!active) return;
      tile_scores<T, kMaxD>(qa, ring.k_stage(stage), k_steps, lane, acc);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kTileKeys / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int64_t key = t * kTileKeys + nt * 8 + c_coord(lane, h * 2 + e).col;
            const float s = key < limit[h] ? __fmul_rn(acc[nt][h * 2 + e], p.scale_log2)
                                           : -INFINITY;
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
    });
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
  for (int64_t j = threadIdx.x; j < flagged_keys; j += kThreads)
    if (ring.region_of(j) >= 0) tile_flag[j / kTileKeys] = 1;  // benign same-value race
  __syncthreads();
  auto next_tile = [&](int64_t t) {
    while (t < n_tiles && t < kMaxFlagTiles && !tile_flag[t]) ++t;
    return t;
  };

  // ---------------------------------------------------------------- pass 2: region mass
  float* row_out[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t target = row0 + block_row[h];
    const bool ok = limit[h] > 0 && lse2[h] != -INFINITY;
    if (!ok) limit[h] = 0;
    row_out[h] = (per_row && ok && target < p.num_targets)
                     ? p.target + (target * p.num_heads + slot) * p.num_regions
                     : nullptr;
  }
  const int ntiles = kCoarse ? region_ntiles(p.num_regions) : kTileKeys / 8;
  const float inv_scale = 1.0f / kMassScale;
  float mass[kTileKeys / 8][4];
#pragma unroll
  for (int rt = 0; rt < kTileKeys / 8; ++rt)
#pragma unroll
    for (int i = 0; i < 4; ++i) mass[rt][i] = 0.0f;

  // Segment outputs: the CTA's column sums (slot s, column c) -> out / partial. All threads;
  // one thread per (slot, column), the warps of a slot added in warp order.
  const int warps_per_slot = kWarps / spc;
  auto publish_column_sums = [&](const float (&m)[kTileKeys / 8][4]) {
    float* mine = colsum + warp * kTileKeys;
    if (active) {
      warp_column_sums(m, lane, ntiles, mine);
    } else {
      mine[lane] = 0.0f;
      mine[lane + kWarpThreads] = 0.0f;
    }
  };
  auto flush_segment = [&](const int8_t* columns, const int32_t* regions) {
    __syncthreads();  // colsum complete
    for (int idx = threadIdx.x; idx < spc * kTileKeys; idx += kThreads) {
      const int s = idx / kTileKeys;
      const int c = idx % kTileKeys;
      const int slot_s = group[s];
      if (slot_s < 0 || slot_s >= p.num_heads) continue;
      if (kCoarse ? c >= p.num_regions : columns[c] != c) continue;
      float v = 0.0f;
      for (int w = 0; w < warps_per_slot; ++w) v += colsum[(s * warps_per_slot + w) * kTileKeys + c];
      if (v == 0.0f) continue;
      const int rg = kCoarse ? c : regions[c];
      float* dst = p.target + (seg_target * p.num_heads + slot_s) * p.num_regions + rg;
      if (p.out_mode == kOutSegmentAtomic) {
        atomicAdd(dst, v * inv_scale);
      } else {
        *dst += v * inv_scale;  // this CTA's partial row: one writer, tiles ordered by barriers
      }
    }
  };

  for_each_tile(ring, next_tile(0), n_tiles, kCoarse ? kRegionColumns : kFirstKeyColumns,
                next_tile, [&](int64_t t, int stage) {
    const int8_t* columns = ring.column_stage(stage);
    if (active) {
      tile_scores<T, kMaxD>(qa, ring.k_stage(stage), k_steps, lane, acc);
#pragma unroll
      for (int nt = 0; nt < kTileKeys / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int h = i / 2;
          const int64_t key = t * kTileKeys + nt * 8 + c_coord(lane, i).col;
          // capped at 1 as on every backend; invisible keys and empty rows give 0
          acc[nt][i] = key < limit[h]
                           ? fminf(exp2f(__fmul_rn(acc[nt][i], p.scale_log2) - lse2[h]), 1.0f) *
                                 kMassScale
                           : 0.0f;
        }
      if (!kCoarse) {
#pragma unroll
        for (int rt = 0; rt < kTileKeys / 8; ++rt)
#pragma unroll
          for (int i = 0; i < 4; ++i) mass[rt][i] = 0.0f;
      }
      mass_mma(acc, columns, lane, ntiles, mass);
    }
    if (kCoarse) return;
    // Scatter: flush this tile's mass; column c holds region regions[c] when columns[c] == c.
    const int32_t* regions = ring.region_stage(stage);
    if (per_row) {
      if (!active) return;
#pragma unroll
      for (int rt = 0; rt < kTileKeys / 8; ++rt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int c = rt * 8 + c_coord(lane, i).col;
          float* row = row_out[i / 2];
          if (row != nullptr && columns[c] == c && mass[rt][i] != 0.0f)
            row[regions[c]] += mass[rt][i] * inv_scale;  // one lane per (row, region) per tile
        }
    } else {
      publish_column_sums(mass);
      flush_segment(columns, regions);  // read before the next tile's barrier
    }
  });

  if (kCoarse) {
    if (per_row) {
      if (active) {
#pragma unroll
        for (int rt = 0; rt < kTileKeys / 8; ++rt)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int c = rt * 8 + c_coord(lane, i).col;
            float* row = row_out[i / 2];
            if (rt < ntiles && row != nullptr && c < p.num_regions)
              row[c] = mass[rt][i] * inv_scale;  // the only writer of this element
          }
      }
    } else {
      publish_column_sums(mass);
      flush_segment(nullptr, nullptr);
    }
  }
#else
  __trap();  // built without sm_80 code: the host refuses such devices before launching
#endif
}

template <typename T, int kMaxD, bool kCoarse>
void launch_for(const MassKernelParams& p, dim3 grid, cudaStream_t stream) {
  constexpr size_t bytes = SharedLayout<kMaxD>::kBytes;
  KAWHI_CUDA_CHECK(cudaFuncSetAttribute(attention_mass_mma_kernel<T, kMaxD, kCoarse>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)),
                   "attention_mass_mma_kernel (shared memory size)");
  attention_mass_mma_kernel<T, kMaxD, kCoarse><<<grid, kThreads, bytes, stream>>>(p);
  KAWHI_CHECK_LAUNCH("attention_mass_mma_kernel");
}

template <typename T, bool kCoarse>
void launch_dim(const MassKernelParams& p, dim3 grid, cudaStream_t stream) {
  if (p.head_dim > 128) {
    launch_for<T, 256, kCoarse>(p, grid, stream);
  } else {
    launch_for<T, 128, kCoarse>(p, grid, stream);
  }
}

}  // namespace

// Called by launch_attention_mass (validated arguments, out and partial zeroed) when
// slots_per_cta > 0; the launcher adds the partial rows afterwards (kOutPartial).
void launch_attention_mass_mma(const MassKernelParams& p, const AttentionMassArgs& a,
                               cudaStream_t stream) {
  int major = 0;
  KAWHI_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a.device),
                   "attention_mass_mma (device capability)");
  if (major < 8)
    throw std::invalid_argument(
        "slots_per_cta: the tensor-core attention_mass kernel needs compute capability >= 8.0; "
        "use slots_per_cta = 0 on this device");
  const dim3 grid(static_cast<unsigned>(a.num_row_blocks), static_cast<unsigned>(a.num_slot_groups));
  const bool coarse = a.num_regions <= kCoarseMaxRegions;
  if (a.dtype == kFloat16) {
    coarse ? launch_dim<__half, true>(p, grid, stream) : launch_dim<__half, false>(p, grid, stream);
  } else {
    coarse ? launch_dim<__nv_bfloat16, true>(p, grid, stream)
           : launch_dim<__nv_bfloat16, false>(p, grid, stream);
  }
}

}  // namespace kawhi
