// Host-side validation of the CUDA ops' raw arguments (see ops.h). Pure C++: compiled in every
// build, so the checks themselves never need a GPU.
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace kawhi {
namespace {

[[noreturn]] void fail(const std::string& op, const std::string& msg) {
  throw std::invalid_argument(op + ": " + msg);
}

void check_min(const std::string& op, const char* name, int64_t v, int64_t lo) {
  if (v < lo)
    fail(op, std::string(name) + ": expected an integer >= " + std::to_string(lo) + ", got " +
                 std::to_string(v));
}

void check_max(const std::string& op, const char* name, int64_t v, int64_t hi, const char* why) {
  if (v > hi)
    fail(op, std::string(name) + ": expected at most " + std::to_string(hi) + " (" + why +
                 "), got " + std::to_string(v));
}

// A pointer must be non-null unless its array has no elements.
void check_ptr(const std::string& op, const char* name, uintptr_t p, int64_t elements) {
  if (p == 0 && elements > 0)
    fail(op, std::string(name) + ": null device pointer for an array of " +
                 std::to_string(elements) + " elements");
}

// a * b, or an error when it overflows int64 (sizes arrive from Python unchecked).
int64_t mul(const std::string& op, int64_t a, int64_t b) {
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a)
    fail(op, "array sizes overflow int64 (" + std::to_string(a) + " * " + std::to_string(b) + ")");
  return a * b;
}

void check_dtype(const std::string& op, int dtype) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    fail(op, "dtype: expected a dtype code 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                 std::to_string(dtype));
}

void check_device(const std::string& op, int device) {
  if (device < 0) fail(op, "device: expected a CUDA device index >= 0, got " + std::to_string(device));
}

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
constexpr int64_t kGridYMax = 65535;

// Per-field checks generated from the op_fields.h tables: counts >= their minimum, strides
// >= 0, dtype codes, device index. Pointers, flags, reals and streams have no check of their own.
void check_field(const std::string& op, const char* name, int64_t v, FieldKind kind,
                 int64_t minimum) {
  if (kind == FieldKind::Count || kind == FieldKind::Stride) check_min(op, name, v, minimum);
}
void check_field(const std::string& op, const char*, int v, FieldKind kind, int64_t) {
  if (kind == FieldKind::Dtype) check_dtype(op, v);
  if (kind == FieldKind::Device) check_device(op, v);
}
void check_field(const std::string&, const char*, uintptr_t, FieldKind, int64_t) {}
void check_field(const std::string&, const char*, bool, FieldKind, int64_t) {}
void check_field(const std::string&, const char*, double, FieldKind, int64_t) {}

#define KAWHI_CHECK_FIELD(c_type, name, init, kind, minimum, doc) \
  check_field(op, #name, a.name, FieldKind::kind, minimum);

// Relations between the fields shared by the two q/k ops (after the per-field checks).
template <typename Args>
void check_qk(const std::string& op, const Args& a) {
  check_max(op, "total_q", a.total_q, kInt32Max, "rows are indexed with int32 tables");
  check_max(op, "total_k", a.total_k, kInt32Max, "cu_seqlens_k is int32");
  if (a.hq % a.hk != 0)
    fail(op, "hk: number of KV heads (" + std::to_string(a.hk) +
                 ") must divide the number of query heads (" + std::to_string(a.hq) + ")");
  check_max(op, "head_dim", a.head_dim, kMaxHeadDim, "a warp holds one row of q in registers");
  check_max(op, "num_heads", a.num_heads, kGridYMax, "one grid row per head");
  check_ptr(op, "q", a.q, mul(op, mul(op, a.total_q, a.hq), a.head_dim));
  check_ptr(op, "k", a.k, mul(op, mul(op, a.total_k, a.hk), a.head_dim));
  check_ptr(op, "cu_seqlens_q", a.cu_seqlens_q, a.num_seqs + 1);
  check_ptr(op, "cu_seqlens_k", a.cu_seqlens_k, a.num_seqs + 1);
  check_ptr(op, "key_region", a.key_region, a.total_k);
  check_ptr(op, "heads", a.heads, a.num_heads);
}

// What the tensor-core attention_mass kernel (attention_mass_mma.cu) takes; the Python wrapper
// chooses it only then (kawhi_kernels/cuda/attention_mass.py: tensor_core_slots).
void validate_tensor_core_path(const std::string& op, const AttentionMassArgs& a) {
  if (a.slots_per_cta != 1 && a.slots_per_cta != 2 && a.slots_per_cta != 4)
    fail(op, "slots_per_cta: expected 0, 1, 2 or 4, got " + std::to_string(a.slots_per_cta));
  if (a.dtype != kFloat16 && a.dtype != kBFloat16)
    fail(op, "dtype: the tensor-core kernel (slots_per_cta > 0) reads float16 or bfloat16, got "
             "code " + std::to_string(a.dtype));
  if (a.head_dim % 16 != 0)
    fail(op, "head_dim: the tensor-core kernel needs a multiple of 16, got " +
                 std::to_string(a.head_dim));
  if (a.q % 16 != 0 || a.k % 16 != 0)
    fail(op, "q/k: the tensor-core kernel needs 16-byte aligned q and k (cp.async)");
  if (a.q_stride_t % 8 || a.q_stride_h % 8 || a.k_stride_t % 8 || a.k_stride_h % 8)
    fail(op, "q_stride_t/q_stride_h/k_stride_t/k_stride_h: the tensor-core kernel needs "
             "strides that are multiples of 8 elements (16-byte rows)");
  check_min(op, "num_slot_groups", a.num_slot_groups, 1);
  check_max(op, "num_slot_groups", a.num_slot_groups, kGridYMax, "one grid row per group");
  check_ptr(op, "slot_groups", a.slot_groups, mul(op, a.num_slot_groups, a.slots_per_cta));
}

}  // namespace

void validate(const AttentionMassArgs& a) {
  const std::string op = "attention_mass";
  KAWHI_ATTENTION_MASS_FIELDS(KAWHI_CHECK_FIELD)
  check_qk(op, a);
  check_max(op, "num_row_blocks", a.num_row_blocks, kInt32Max, "one grid column per block");
  if (!std::isfinite(a.softmax_scale) || a.softmax_scale <= 0.0)
    fail(op, "softmax_scale: expected a positive finite number, got " +
                 std::to_string(a.softmax_scale));
  check_ptr(op, "row_blocks", a.row_blocks, mul(op, a.num_row_blocks, 4));
  const int64_t out_rows = a.segmented ? a.num_segments : a.total_q;
  const int64_t row_elems = mul(op, a.num_heads, a.num_regions);
  check_ptr(op, "out", a.out, mul(op, out_rows, row_elems));
  if (a.segmented && a.deterministic) {
    check_ptr(op, "partial", a.partial, mul(op, a.num_row_blocks, row_elems));
    check_ptr(op, "segment_block_start", a.segment_block_start, a.num_segments + 1);
    check_ptr(op, "segment_blocks", a.segment_blocks, a.num_row_blocks);
  }
  if (a.slots_per_cta != 0) validate_tensor_core_path(op, a);
}

void validate(const CosineAlignmentArgs& a) {
  const std::string op = "cosine_alignment";
  KAWHI_COSINE_ALIGNMENT_FIELDS(KAWHI_CHECK_FIELD)
  check_qk(op, a);
  const int64_t kbar_items = mul(op, mul(op, a.num_seqs, a.num_regions), a.hk);
  check_max(op, "num_seqs * num_regions * hk", kbar_items, kInt32Max, "one thread block each");
  check_ptr(op, "kbar", a.kbar, mul(op, kbar_items, a.head_dim));
  const int64_t out_elems = mul(op, a.total_q, a.per_head ? mul(op, a.num_heads, a.num_regions)
                                                          : a.num_regions);
  check_ptr(op, "out", a.out, out_elems);
}

int64_t sguf_shared_bytes(int64_t patch, int64_t radius) {
  const int64_t edge = patch + 2 * (radius + 1);   // lightness tile: patch plus halo
  const int64_t inner = patch + 2;                 // smoothed tile: patch plus the Sobel ring
  const int64_t floats = edge * edge + inner * edge + (2 * radius + 1) + 4 * 32;
  return floats * static_cast<int64_t>(sizeof(float));
}

void validate(const SgufDescriptorArgs& a) {
  const std::string op = "sguf_descriptors";
  KAWHI_SGUF_DESCRIPTOR_FIELDS(KAWHI_CHECK_FIELD)
  check_max(op, "num_images", a.num_images, kGridYMax, "one grid row per image");
  check_max(op, "patch", a.patch, 1024, "one thread block per patch");
  check_max(op, "num_images * grid_h * grid_w", mul(op, a.num_images, mul(op, a.grid_h, a.grid_w)),
            kInt32Max, "one thread block per patch");
  if (a.height != mul(op, a.grid_h, a.patch) || a.width != mul(op, a.grid_w, a.patch))
    fail(op, "height/width: expected (grid_h * patch) x (grid_w * patch) = " +
                 std::to_string(a.grid_h * a.patch) + " x " + std::to_string(a.grid_w * a.patch) +
                 ", got " + std::to_string(a.height) + " x " + std::to_string(a.width));
  check_max(op, "radius", a.radius, 1024, "Gaussian taps are staged in shared memory");
  const int64_t pixels = mul(op, mul(op, a.num_images, a.height), a.width);
  check_ptr(op, "image", a.image, mul(op, pixels, 3));
  check_ptr(op, "lut", a.lut, 3 * 256);
  check_ptr(op, "weights", a.weights, 2 * a.radius + 1);
  const int64_t n = mul(op, a.num_images, mul(op, a.grid_h, a.grid_w));
  check_ptr(op, "lam_max", a.lam_max, n);
  check_ptr(op, "lam_min", a.lam_min, n);
  check_ptr(op, "lightness", a.lightness, n);
}

void validate(const GridPyramidArgs& a) {
  const std::string op = "grid_pyramid";
  KAWHI_GRID_PYRAMID_FIELDS(KAWHI_CHECK_FIELD)
  check_max(op, "num_levels", a.num_levels, kMaxPyramidLevels, "cell sizes 1, 2, ..., 2^16");
  check_max(op, "num_lead * num_strips", mul(op, a.num_lead, a.num_strips), kInt32Max,
            "one thread block per (leading row, strip)");
  check_max(op, "shared_floats", a.shared_floats, kMaxStripTokens,
            "a block stages at most 2^24 tokens");
  check_ptr(op, "mass", a.mass, mul(op, a.num_lead, a.num_tokens));
  check_ptr(op, "strips", a.strips, mul(op, a.num_strips, 3));
  check_ptr(op, "cell_sizes", a.cell_sizes, a.num_levels);
  check_ptr(op, "cell_base", a.cell_base, mul(op, a.num_strips, a.num_levels));
  check_ptr(op, "outs", a.outs, a.num_levels);
  check_ptr(op, "out_cells", a.out_cells, a.num_levels);
}

#undef KAWHI_CHECK_FIELD

}  // namespace kawhi
