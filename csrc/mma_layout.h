// Index math of the tensor-core attention_mass kernel (attention_mass_mma.cu), kept apart from
// the kernel as constexpr host/device functions so that tests can check it on a CPU
// (module.cpp exposes them as _C.mma_layout_*; tests/test_cuda_backend.py).
//
// Conventions (PTX ISA, mma.sync.aligned.m16n8k16 with .f16/.bf16 inputs and .f32 accumulators;
// ldmatrix.sync.aligned.m8n8.x4.shared.b16):
//   lane l of a warp has group g = l / 4 and thread-in-group t = l % 4;
//   A (16 x 16, row major) regs a0..a3 hold two consecutive columns each:
//       a0 (g, 2t..2t+1), a1 (g + 8, 2t..), a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..);
//   B (16 x 8, "col": k x n) regs b0, b1: b0 (k = 2t..2t+1, n = g), b1 (k = 2t + 8.., n = g);
//   C/D (16 x 8 fp32) c0..c3: c0, c1 (g, 2t + {0, 1}), c2, c3 (g + 8, 2t + {0, 1});
//   ldmatrix x4: lane l supplies the address of row l % 8 of matrix l / 8 and receives, in
//       reg j, the two elements (row g, cols 2t, 2t + 1) of matrix j.
//   second MMA (mass): P as the A operand straight from the score accumulators (p_a_source),
//       times a one-hot B built in registers (one_hot_key / one_hot_col).
// Pure C++ (no CUDA headers): the host compiler builds it into the module's test helpers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KAWHI_HD __host__ __device__ __forceinline__
#else
#define KAWHI_HD inline
#endif

namespace kawhi {
namespace mma {

#ifndef KAWHI_MMA_STAGES
// K ring depth. 3 stages: define it for the host and the CUDA compiler alike (module.cpp exposes
// shared_bytes), e.g. KAWHI_CMAKE_ARGS="-DCMAKE_CXX_FLAGS=-DKAWHI_MMA_STAGES=3
// -DCMAKE_CUDA_FLAGS=-DKAWHI_MMA_STAGES=3" for setup.py.
#define KAWHI_MMA_STAGES 2
#endif

constexpr int kWarpThreads = 32;
constexpr int kTileKeys = 64;     // keys per K tile (8 n-tiles of 8 per warp)
constexpr int kWarpRows = 16;     // M rows per warp (one m16 tile)
constexpr int kWarps = 4;         // warps per CTA
constexpr int kChunkHalves = 8;   // 16-byte chunk of a shared-memory K row, in 16-bit elements
constexpr int kStages = KAWHI_MMA_STAGES;  // K ring stages (cp.async pipeline depth)
static_assert(kStages == 2 || kStages == 3, "KAWHI_MMA_STAGES: 2 or 3");
constexpr int kMaxFlagTiles = 512;  // key tiles with a region bitmap (32k keys); beyond: visited
// Regions up to this many take the coarse kernel: the mass of a warp's 16 rows on every region
// stays in one fp32 [16 x 64] accumulator (8 n-tiles of the second MMA) for the whole pass.
constexpr int kCoarseMaxRegions = 64;
// P (in [0, 1]) enters the second MMA as fp16 hi + lo parts of P * kMassScale (2^15: the largest
// value, 32768, is an fp16 number and probabilities down to 2^-39 stay normal in fp16); the
// accumulator is multiplied by 1 / kMassScale, exactly, when it is written out.
constexpr float kMassScale = 32768.0f;

// Dynamic shared memory of the kernel for K rows padded to max_d 16-bit elements: the K ring,
// the ring's region ids (int32) and one-hot columns (int8), the per-warp column sums (fp32) and
// the tile bitmap (bytes).
KAWHI_HD constexpr int64_t shared_bytes(int max_d) {
  return int64_t{2} * kStages * kTileKeys * max_d + int64_t{4} * kStages * kTileKeys +
         int64_t{4} * kWarps * kTileKeys + int64_t{1} * kStages * kTileKeys + kMaxFlagTiles;
}

struct RowCol {
  int row;
  int col;
};

// Accumulator element i (0..3) of lane -> (row 0..15, col 0..7) of the 16 x 8 C tile.
KAWHI_HD constexpr RowCol c_coord(int lane, int i) {
  return RowCol{lane / 4 + (i / 2) * 8, (lane % 4) * 2 + (i % 2)};
}

// A register r (0..3), half h (0..1) of lane -> (row 0..15, col 0..15) of the 16 x 16 A tile.
KAWHI_HD constexpr RowCol a_coord(int lane, int r, int h) {
  return RowCol{lane / 4 + (r % 2) * 8, (lane % 4) * 2 + h + (r / 2) * 8};
}

// B register r (0..1), half h of lane -> (k 0..15 as row, n 0..7 as col) of the 16 x 8 B tile.
KAWHI_HD constexpr RowCol b_coord(int lane, int r, int h) {
  return RowCol{(lane % 4) * 2 + h + r * 8, lane / 4};
}

// ldmatrix x4 on a K tile stored [key][d]: the (key, 16-byte chunk) offsets, relative to the
// 16-key x 16-d block at (n0, k0), whose row lane `lane` addresses. Matrices: 0 (keys 0..7,
// d 0..7), 1 (keys 0..7, d 8..15), 2 (keys 8..15, d 0..7), 3 (keys 8..15, d 8..15), so regs
// 0, 1 are b0, b1 of the n-tile of keys n0..n0+7 and regs 2, 3 those of keys n0+8..n0+15.
KAWHI_HD constexpr RowCol ldmatrix_k_source(int lane) {
  return RowCol{(lane % 8) + ((lane / 8) / 2) * 8, (lane / 8) % 2};
}

// Element (row, col) of the 8 x 8 matrix j that lane receives in half h of reg j (ldmatrix).
KAWHI_HD constexpr RowCol ldmatrix_fragment(int lane, int h) {
  return RowCol{lane / 4, (lane % 4) * 2 + h};
}

// Physical 16-byte chunk of logical chunk `chunk` in shared-memory K row `row`: XOR with the row
// mod 8 inside aligned groups of 8 chunks, so the 8 rows one ldmatrix matrix reads hit 8
// different 16-byte bank groups. A bijection on [0, row_chunks) when row_chunks % 8 == 0 (the
// kernel pads rows to 128 or 256 elements).
KAWHI_HD constexpr int swizzle_chunk(int row, int chunk) { return chunk ^ (row % 8); }

// Keys [0, limit) of its sequence are visible to local query row `local` (bottom-right causal:
// key j <= local + lk - lq); limit <= 0 means none.
KAWHI_HD constexpr int64_t visible_keys(int64_t local, int64_t lq, int64_t lk, bool causal) {
  return (!causal || local + lk - lq + 1 >= lk) ? lk : local + lk - lq + 1;
}

// K tiles a row block with local rows [first, first + rows) reads: the keys visible to its
// last row (the largest limit), in tiles of kTileKeys. 0 when no row sees a key.
KAWHI_HD constexpr int64_t key_tiles_needed(int64_t first, int64_t rows, int64_t lq, int64_t lk,
                                            bool causal) {
  const int64_t limit = visible_keys(first + rows - 1, lq, lk, causal);
  return limit <= 0 ? 0 : (limit + kTileKeys - 1) / kTileKeys;
}

// Warp w of a CTA serving `slots_per_cta` output slots (1, 2 or 4): its slot index in the CTA's
// group and its 16-row sub-block of the CTA's row block (kWarps / slots_per_cta sub-blocks).
KAWHI_HD constexpr RowCol warp_assignment(int warp, int slots_per_cta) {
  return RowCol{warp / (kWarps / slots_per_cta), warp % (kWarps / slots_per_cta)};
}

// Rows of a CTA's row block for `slots_per_cta` slots.
KAWHI_HD constexpr int block_rows_for(int slots_per_cta) {
  return kWarpRows * (kWarps / slots_per_cta);
}

// The second MMA (region mass = P x one-hot): A register r (0..3) of k-chunk kc (keys
// 16 kc .. 16 kc + 15) of P, which sits in the score accumulators acc[n-tile][element] of the
// first MMA, is the pair (acc[row][col], acc[row][col + 1]) with {row: n-tile, col: element}
// returned here (FlashAttention-2's register reuse: C and A fragments share rows and columns).
KAWHI_HD constexpr RowCol p_a_source(int kc, int r) { return RowCol{2 * kc + r / 2, (r % 2) * 2}; }

// One-hot B operand of the second MMA: half h of B register r of lane, for k-chunk kc and
// region n-tile rt, is 1 when the one-hot column of key one_hot_key(...) is one_hot_col(...).
KAWHI_HD constexpr int one_hot_key(int lane, int kc, int r, int h) {
  return kc * 16 + b_coord(lane, r, h).row;
}
KAWHI_HD constexpr int one_hot_col(int lane, int rt) { return rt * 8 + b_coord(lane, 0, 0).col; }

// Region n-tiles (8 columns each) the coarse kernel's second MMA covers for R regions.
KAWHI_HD constexpr int region_ntiles(int64_t num_regions) {
  return static_cast<int>((num_regions + 7) / 8);
}

// Scatter kernel (R > kCoarseMaxRegions): the one-hot column of key `key` of a tile is the first
// key of the tile with the same region (-1 for keys without one), so every region of the tile
// owns one accumulator column. Host form of the rule the kernel evaluates with warp
// intrinsics (attention_mass_mma.cu: scatter_column), for tests.
inline int scatter_column_host(const int32_t* tile_region, int key) {
  if (tile_region[key] < 0) return -1;
  int j = 0;
  while (tile_region[j] != tile_region[key]) ++j;
  return j;
}

}  // namespace mma
}  // namespace kawhi
