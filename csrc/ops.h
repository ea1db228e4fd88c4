// Argument structs, host-side validation and launchers of the CUDA ops.
//
// Pure C++ header (no CUDA headers): module.cpp, compiled by the host compiler, fills these
// structs from Python integers (raw device pointers, sizes, strides, dtype codes, stream handle),
// validate_*() checks them on the host and throws std::invalid_argument (a Python ValueError)
// naming the argument, and launch_*() (defined in the .cu files, CUDA builds only) runs the
// kernels on the given stream, throwing kawhi::CudaError (a Python RuntimeError) that names the
// kernel and the CUDA error when a runtime call or a launch fails.
//
// Pointers are device addresses as integers (torch's Tensor.data_ptr()); 0 means "absent" and is
// accepted only where an argument is optional or its array has no elements. Strides are in
// elements. All index arithmetic in the kernels is int64. The struct members come from the
// field tables of op_fields.h (one list for the struct, the binding and the per-field checks).
#pragma once

#include <cstdint>

#include "op_fields.h"

namespace kawhi {

// Element types of q/k (dtype codes exchanged with Python).
enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest head dim the kernels accept: one warp holds a row, 8 values per lane.
constexpr int64_t kMaxHeadDim = 256;

// attention_mass: softmax mass of query rows on key regions.
//   s_ij = softmax_scale * q_i . k_j over the keys j of row i's sequence visible to it
//   (causal: j <= i_local + Lk - Lq), p_ij = exp(s_ij - lse_i) with lse_i the natural-log
//   normaliser (computed by an online softmax, or read from `lse` where a non-finite value
//   counts as 0, as the torch reference does), and
//   out[row i or its segment, slot, key_region[j]] += p_ij for key_region[j] >= 0.
// Work is split into row blocks (host-built table, int32 [num_row_blocks, 4]: sequence, first
// global row, row count, segment): every row of a block belongs to one sequence and, when
// segmented, one segment (rows of segment -1 and sequences without keys appear in no block).
// Accumulation: per-row outputs are owned by one warp (no atomics); segmented outputs use fp32
// atomicAdd, or with `deterministic` per-block partial rows [num_row_blocks, num_heads, R]
// summed afterwards in the fixed order of the CSR lists segment_block_start [num_segments + 1]
// / segment_blocks [num_row_blocks].
struct AttentionMassArgs {
  KAWHI_ATTENTION_MASS_FIELDS(KAWHI_DECLARE_FIELD)
};

// cosine_alignment: mean cosine of each query row to the keys of each region of its sequence.
//   kbar[b, r, kv, :] = mean over keys j of sequence b with key_region[j] == r of k_j / |k_j|
//   (zero vectors count with unit vector 0; 0 for an empty region), written to the fp32
//   workspace kbar [num_seqs, num_regions, hk, d]; then for row i of sequence b and slot s
//   (head h = heads[s], kv = h / (hq / hk)): c = (q_i / |q_i|) . kbar[b, r, kv] and
//   out[i, s, r] = c (per_head) or out[i, r] = mean over slots of c.
struct CosineAlignmentArgs {
  KAWHI_COSINE_ALIGNMENT_FIELDS(KAWHI_DECLARE_FIELD)
};

// SGUF per-patch descriptors of a batch of same-size uint8 RGB images (one fused kernel, one
// thread block per patch): CIELab L through per-channel lookup tables (lut fp32 [3, 256]:
// linearised sRGB times the Y row of the XYZ matrix), L = 116 f(Y) - 16, Gaussian smoothing
// with `weights` fp32 [2 * radius + 1] (scipy "reflect" boundary), Sobel gradients, patch means
// of the structure tensor, its eigenvalues, and the patch mean of smoothed L.
struct SgufDescriptorArgs {
  KAWHI_SGUF_DESCRIPTOR_FIELDS(KAWHI_DECLARE_FIELD)
};

// grid_pyramid: sums of per-token values over square cells of each frame, several cell sizes.
//   A frame (t, h, w) of an image is h rows of w tokens, contiguous in mass's last dim; at cell
//   size s its cells are ceil(h/s) x ceil(w/s) in raster order (ragged at the right and bottom).
// The host splits every frame into strips: bands of whole rows whose first row is a multiple of
// every cell size (or the whole frame), so no cell straddles two strips. One thread block per
// (leading row, strip) stages the strip in shared memory as fp32 (16-byte loads), then builds
// the levels in ascending cell size, each from the largest smaller level whose size divides it
// (else from the tokens), keeping each level in shared memory for the next; every output cell
// is written once by one thread, summed in a fixed order (deterministic, no atomics).
struct GridPyramidArgs {
  KAWHI_GRID_PYRAMID_FIELDS(KAWHI_DECLARE_FIELD)
};

// Most levels one launch takes (cell sizes 1, 2, ..., 2^16: ops/grid_pyramid.py MAX_LEVELS).
constexpr int64_t kMaxPyramidLevels = 17;
// Largest strip (rows * width tokens) a block stages; every block index is then an int32.
constexpr int64_t kMaxStripTokens = int64_t{1} << 24;

#if defined(__CUDACC__)
#define KAWHI_HOST_DEVICE __host__ __device__
#else
#define KAWHI_HOST_DEVICE
#endif

// fp32 shared-memory slots a block needs for a strip of `rows` x `width` tokens: the strip, plus
// ceil(rows/s) * ceil(width/s) cells for every cell size s > 1 (sizes ascending, distinct), plus
// 4 slots of slack that let the strip start where its 16-byte loads land on 16-byte boundaries.
KAWHI_HOST_DEVICE inline int64_t grid_pyramid_shared_floats(int64_t rows, int64_t width,
                                                            const int32_t* sizes, int64_t n) {
  int64_t floats = rows * width + 4;
  for (int64_t l = 0; l < n; ++l) {
    const int64_t s = sizes[l];
    if (s > 1) floats += ((rows + s - 1) / s) * ((width + s - 1) / s);
  }
  return floats;
}

// Kinds of the op_fields.h table rows (what the generic per-field check does).
enum class FieldKind { Pointer, Count, Stride, Flag, Real, Dtype, Stream, Device };

// Host-side checks (always compiled): throw std::invalid_argument naming the argument.
void validate(const AttentionMassArgs& a);
void validate(const CosineAlignmentArgs& a);
void validate(const SgufDescriptorArgs& a);
void validate(const GridPyramidArgs& a);

// Dynamic shared memory (bytes) the descriptor kernel needs for a patch size and radius.
int64_t sguf_shared_bytes(int64_t patch, int64_t radius);

#ifdef KAWHI_WITH_CUDA
// Launchers (attention_mass.cu, cosine_alignment.cu, sguf_descriptors.cu, grid_pyramid.cu).
// They call validate() first, then launch asynchronously on args.stream; errors throw
// kawhi::CudaError.
void launch_attention_mass(const AttentionMassArgs& a);
void launch_cosine_alignment(const CosineAlignmentArgs& a);
void launch_sguf_descriptors(const SgufDescriptorArgs& a);
void launch_grid_pyramid(const GridPyramidArgs& a);
#endif

}  // namespace kawhi
