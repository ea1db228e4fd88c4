// The one parameter struct of the attention_mass kernels (the warp-per-row kernel in
// attention_mass.cu and the tensor-core kernels in attention_mass_mma.cu), filled once on the
// host from the validated AttentionMassArgs (ops.h) by make_mass_params().
//
// Pure C++ (no CUDA headers): raw device pointers, sizes and strides in elements.
#pragma once

#include <cstdint>

#include "ops.h"

namespace kawhi {

// Where a kernel puts a row's mass:
//   kOutRows           out[row, slot, region]: one writer per element, no atomics;
//   kOutSegmentAtomic  out[segment, slot, region] with fp32 atomics (run to run order varies);
//   kOutPartial        partial[row block, slot, region], one writer per element; a second
//                      kernel (sum_partials_kernel) adds a segment's blocks in a fixed order.
enum OutMode : int { kOutRows = 0, kOutSegmentAtomic = 1, kOutPartial = 2 };

struct MassKernelParams {
  const void* q;
  const void* k;
  const int32_t* cu_q;
  const int32_t* cu_k;
  const int32_t* key_region;
  const int32_t* heads;
  const int32_t* row_blocks;
  const int32_t* slot_groups;  // tensor-core kernels only
  const float* lse;
  float* target;  // out (kOutRows, kOutSegmentAtomic) or partial (kOutPartial)
  int64_t hq, hk, head_dim, num_seqs, num_regions, num_heads, num_targets, num_row_blocks;
  int64_t q_stride_t, q_stride_h, k_stride_t, k_stride_h, lse_stride_h, lse_stride_t;
  float scale;       // softmax_scale
  float scale_log2;  // softmax_scale * log2(e): the tensor-core kernels score in base 2
  int causal;
  int out_mode;
  int slots_per_cta;
};

// Host: the parameters of a launch (target and num_targets follow the output mode).
inline MassKernelParams make_mass_params(const AttentionMassArgs& a) {
  MassKernelParams p{};
  p.q = reinterpret_cast<const void*>(a.q);
  p.k = reinterpret_cast<const void*>(a.k);
  p.cu_q = reinterpret_cast<const int32_t*>(a.cu_seqlens_q);
  p.cu_k = reinterpret_cast<const int32_t*>(a.cu_seqlens_k);
  p.key_region = reinterpret_cast<const int32_t*>(a.key_region);
  p.heads = reinterpret_cast<const int32_t*>(a.heads);
  p.row_blocks = reinterpret_cast<const int32_t*>(a.row_blocks);
  p.slot_groups = reinterpret_cast<const int32_t*>(a.slot_groups);
  p.lse = reinterpret_cast<const float*>(a.lse);
  p.hq = a.hq;
  p.hk = a.hk;
  p.head_dim = a.head_dim;
  p.num_seqs = a.num_seqs;
  p.num_regions = a.num_regions;
  p.num_heads = a.num_heads;
  p.num_row_blocks = a.num_row_blocks;
  p.q_stride_t = a.q_stride_t;
  p.q_stride_h = a.q_stride_h;
  p.k_stride_t = a.k_stride_t;
  p.k_stride_h = a.k_stride_h;
  p.lse_stride_h = a.lse_stride_h;
  p.lse_stride_t = a.lse_stride_t;
  p.scale = static_cast<float>(a.softmax_scale);
  p.scale_log2 = static_cast<float>(a.softmax_scale * 1.4426950408889634);
  p.causal = a.causal ? 1 : 0;
  p.slots_per_cta = static_cast<int>(a.slots_per_cta);
  if (!a.segmented) {
    p.out_mode = kOutRows;
    p.target = reinterpret_cast<float*>(a.out);
    p.num_targets = a.total_q;
  } else if (!a.deterministic) {
    p.out_mode = kOutSegmentAtomic;
    p.target = reinterpret_cast<float*>(a.out);
    p.num_targets = a.num_segments;
  } else {
    p.out_mode = kOutPartial;
    p.target = reinterpret_cast<float*>(a.partial);
    p.num_targets = a.num_row_blocks;
  }
  return p;
}

}  // namespace kawhi
