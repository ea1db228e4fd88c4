// The one field list of every CUDA op's argument struct (an X-macro table).
//
// Each row is X(c_type, name, initial_value, kind, minimum, doc). The table generates
//   * the struct members in ops.h,
//   * the pybind11 properties and _C.op_fields(op) in module.cpp (Python fills the structs by
//     name from that list, kawhi_kernels/cuda/_launch.py: make_args),
//   * the per-field checks in ops_validation.cpp (by kind: counts >= minimum, strides >= 0,
//     dtype codes, device index); checks that relate fields (pointer sizes, divisibility,
//     limits) stay hand-written there.
// Adding a field is one row here (plus the value the Python wrapper passes and the kernel's use).
//
// Kinds: Pointer (device address as an integer, 0 = absent), Count (int64 >= minimum),
// Stride (int64 >= 0, in elements), Flag (bool), Real (double), Dtype (DtypeCode),
// Stream (cudaStream_t as an integer, 0 = legacy default stream), Device (CUDA index >= 0).
#pragma once

// clang-format off
#define KAWHI_ATTENTION_MASS_FIELDS(X)                                                          \
  X(uintptr_t, q, 0, Pointer, 0, "q [total_q, hq, head_dim], last dim contiguous")             \
  X(uintptr_t, k, 0, Pointer, 0, "k [total_k, hk, head_dim], last dim contiguous")             \
  X(int, dtype, -1, Dtype, 0, "DtypeCode of q and k")                                         \
  X(int64_t, total_q, -1, Count, 0, "query rows of the packed batch")                         \
  X(int64_t, total_k, -1, Count, 0, "keys of the packed batch")                               \
  X(int64_t, hq, -1, Count, 1, "query heads")                                                 \
  X(int64_t, hk, -1, Count, 1, "KV heads (divides hq)")                                       \
  X(int64_t, head_dim, -1, Count, 1, "head dim D")                                            \
  X(int64_t, q_stride_t, -1, Stride, 0, "q stride over rows")                                 \
  X(int64_t, q_stride_h, -1, Stride, 0, "q stride over heads")                                \
  X(int64_t, k_stride_t, -1, Stride, 0, "k stride over keys")                                 \
  X(int64_t, k_stride_h, -1, Stride, 0, "k stride over heads")                                \
  X(uintptr_t, cu_seqlens_q, 0, Pointer, 0, "int32 [num_seqs + 1]")                           \
  X(uintptr_t, cu_seqlens_k, 0, Pointer, 0, "int32 [num_seqs + 1]")                           \
  X(int64_t, num_seqs, -1, Count, 1, "sequences B")                                           \
  X(uintptr_t, key_region, 0, Pointer, 0, "int32 [total_k] in [0, num_regions) or -1")        \
  X(int64_t, num_regions, -1, Count, 0, "regions R")                                          \
  X(uintptr_t, heads, 0, Pointer, 0, "int32 [num_heads]: query head of each output slot")     \
  X(int64_t, num_heads, -1, Count, 1, "output head slots")                                    \
  X(uintptr_t, row_blocks, 0, Pointer, 0, "int32 [num_row_blocks, 4]: seq, row0, rows, seg")  \
  X(int64_t, num_row_blocks, -1, Count, 0, "rows of the row-block table")                     \
  X(uintptr_t, lse, 0, Pointer, 0, "optional fp32 [hq, total_q] natural-log normalisers")     \
  X(int64_t, lse_stride_h, 0, Stride, 0, "lse stride over heads")                             \
  X(int64_t, lse_stride_t, 0, Stride, 0, "lse stride over rows")                              \
  X(bool, causal, true, Flag, 0, "bottom-right aligned causal mask per sequence")             \
  X(double, softmax_scale, 0.0, Real, 0, "score scale (positive, finite)")                    \
  X(bool, segmented, false, Flag, 0, "outputs per segment instead of per row")                \
  X(int64_t, num_segments, 0, Count, 0, "segments S (segmented)")                             \
  X(bool, deterministic, false, Flag, 0, "segment sums in a fixed order (no float atomics)")   \
  X(uintptr_t, out, 0, Pointer, 0, "fp32 [num_segments or total_q, num_heads, num_regions]")  \
  X(uintptr_t, partial, 0, Pointer, 0, "fp32 [num_row_blocks, num_heads, num_regions] scratch") \
  X(uintptr_t, segment_block_start, 0, Pointer, 0, "int32 [num_segments + 1] CSR starts")     \
  X(uintptr_t, segment_blocks, 0, Pointer, 0, "int32 [num_row_blocks] CSR block lists")       \
  X(int64_t, slots_per_cta, 0, Count, 0,                                                        \
    "0: warp-per-row kernel; 1, 2 or 4: tensor-core kernel with that many slots per CTA")     \
  X(uintptr_t, slot_groups, 0, Pointer, 0,                                                      \
    "int32 [num_slot_groups, slots_per_cta]: slots sharing one KV head, -1 padded")           \
  X(int64_t, num_slot_groups, 0, Count, 0, "rows of slot_groups (tensor-core kernel)")        \
  X(uintptr_t, stream, 0, Stream, 0, "cudaStream_t as an integer")                            \
  X(int, device, -1, Device, 0, "CUDA device index the pointers live on")

#define KAWHI_COSINE_ALIGNMENT_FIELDS(X)                                                        \
  X(uintptr_t, q, 0, Pointer, 0, "q [total_q, hq, head_dim], last dim contiguous")             \
  X(uintptr_t, k, 0, Pointer, 0, "k [total_k, hk, head_dim], last dim contiguous")             \
  X(int, dtype, -1, Dtype, 0, "DtypeCode of q and k")                                         \
  X(int64_t, total_q, -1, Count, 0, "query rows of the packed batch")                         \
  X(int64_t, total_k, -1, Count, 0, "keys of the packed batch")                               \
  X(int64_t, hq, -1, Count, 1, "query heads")                                                 \
  X(int64_t, hk, -1, Count, 1, "KV heads (divides hq)")                                       \
  X(int64_t, head_dim, -1, Count, 1, "head dim D")                                            \
  X(int64_t, q_stride_t, -1, Stride, 0, "q stride over rows")                                 \
  X(int64_t, q_stride_h, -1, Stride, 0, "q stride over heads")                                \
  X(int64_t, k_stride_t, -1, Stride, 0, "k stride over keys")                                 \
  X(int64_t, k_stride_h, -1, Stride, 0, "k stride over heads")                                \
  X(uintptr_t, cu_seqlens_q, 0, Pointer, 0, "int32 [num_seqs + 1]")                           \
  X(uintptr_t, cu_seqlens_k, 0, Pointer, 0, "int32 [num_seqs + 1]")                           \
  X(int64_t, num_seqs, -1, Count, 1, "sequences B")                                           \
  X(uintptr_t, key_region, 0, Pointer, 0, "int32 [total_k] in [0, num_regions) or -1")        \
  X(int64_t, num_regions, -1, Count, 0, "regions R")                                          \
  X(uintptr_t, heads, 0, Pointer, 0, "int32 [num_heads]: query head of each output slot")     \
  X(int64_t, num_heads, -1, Count, 1, "output head slots")                                    \
  X(bool, per_head, false, Flag, 0, "per-head outputs instead of their mean")                 \
  X(uintptr_t, kbar, 0, Pointer, 0, "fp32 workspace [num_seqs, num_regions, hk, head_dim]")   \
  X(uintptr_t, out, 0, Pointer, 0, "fp32 [total_q, num_heads, R] (per_head) or [total_q, R]") \
  X(uintptr_t, stream, 0, Stream, 0, "cudaStream_t as an integer")                            \
  X(int, device, -1, Device, 0, "CUDA device index the pointers live on")

#define KAWHI_SGUF_DESCRIPTOR_FIELDS(X)                                                         \
  X(uintptr_t, image, 0, Pointer, 0, "uint8 [num_images, height, width, 3]")                  \
  X(int64_t, num_images, -1, Count, 0, "images in the batch")                                 \
  X(int64_t, height, -1, Count, 0, "image height (grid_h * patch)")                           \
  X(int64_t, width, -1, Count, 0, "image width (grid_w * patch)")                             \
  X(int64_t, stride_b, -1, Stride, 0, "image stride over images")                             \
  X(int64_t, stride_y, -1, Stride, 0, "image stride over rows")                               \
  X(int64_t, stride_x, -1, Stride, 0, "image stride over columns")                            \
  X(int64_t, stride_c, -1, Stride, 0, "image stride over channels")                           \
  X(int64_t, grid_h, -1, Count, 1, "token grid rows")                                         \
  X(int64_t, grid_w, -1, Count, 1, "token grid columns")                                      \
  X(int64_t, patch, -1, Count, 1, "square patch size in pixels")                              \
  X(uintptr_t, lut, 0, Pointer, 0, "fp32 [3, 256] luminance lookup tables")                   \
  X(uintptr_t, weights, 0, Pointer, 0, "fp32 [2 * radius + 1] Gaussian taps")                 \
  X(int64_t, radius, -1, Count, 0, "Gaussian radius")                                         \
  X(uintptr_t, lam_max, 0, Pointer, 0, "fp32 [num_images, grid_h * grid_w]")                  \
  X(uintptr_t, lam_min, 0, Pointer, 0, "fp32 [num_images, grid_h * grid_w]")                  \
  X(uintptr_t, lightness, 0, Pointer, 0, "fp32 [num_images, grid_h * grid_w]")                \
  X(uintptr_t, stream, 0, Stream, 0, "cudaStream_t as an integer")                            \
  X(int, device, -1, Device, 0, "CUDA device index the pointers live on")
#define KAWHI_GRID_PYRAMID_FIELDS(X)                                                            \
  X(uintptr_t, mass, 0, Pointer, 0, "mass [num_lead, num_tokens] (row stride mass_stride)")    \
  X(int, dtype, -1, Dtype, 0, "DtypeCode of mass")                                            \
  X(int64_t, num_lead, -1, Count, 0, "leading rows of mass (product of its leading dims)")    \
  X(int64_t, num_tokens, -1, Count, 0, "image tokens N = sum of t * h * w")                   \
  X(int64_t, mass_stride, -1, Stride, 0, "mass stride over leading rows")                     \
  X(uintptr_t, strips, 0, Pointer, 0,                                                           \
    "int64 [num_strips, 3]: first token, width, rows of each frame strip (a band of rows)")    \
  X(int64_t, num_strips, -1, Count, 0, "strips of all frames of all images")                  \
  X(uintptr_t, cell_sizes, 0, Pointer, 0, "int32 [num_levels] ascending distinct cell sizes")  \
  X(int64_t, num_levels, -1, Count, 1, "levels L")                                            \
  X(uintptr_t, cell_base, 0, Pointer, 0,                                                        \
    "int64 [num_strips, num_levels]: output cell of each strip's first cell per level")        \
  X(uintptr_t, outs, 0, Pointer, 0, "uint64 [num_levels]: fp32 [num_lead, cells_l] outputs")   \
  X(uintptr_t, out_cells, 0, Pointer, 0, "int64 [num_levels]: cells_l (each output's row stride)") \
  X(int64_t, shared_floats, -1, Count, 1,                                                       \
    "fp32 shared-memory slots per block (grid_pyramid_shared_floats of the largest strip)")     \
  X(uintptr_t, stream, 0, Stream, 0, "cudaStream_t as an integer")                            \
  X(int, device, -1, Device, 0, "CUDA device index the pointers live on")
// clang-format on

// Declares one struct member from a table row.
#define KAWHI_DECLARE_FIELD(c_type, name, init, kind, minimum, doc) c_type name = init;
