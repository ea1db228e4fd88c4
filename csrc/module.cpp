// pybind11 module kawhi_kernels._C.
//
// Independent of torch's C++ ABI on purpose: no torch headers, no libtorch. Arrays arrive as
// numpy arrays (host) or raw pointers; the CUDA runtime, when built in, is linked statically.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "ops.h"
#include "sguf_cpu.h"
#include "union_find.h"
#ifdef KAWHI_WITH_CUDA
#include "cuda_info.h"
#endif

namespace py = pybind11;

#ifndef KAWHI_CXX_COMPILER
#define KAWHI_CXX_COMPILER "unknown"
#endif
#ifndef KAWHI_BUILD_TYPE
#define KAWHI_BUILD_TYPE "unknown"
#endif

namespace {

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

const double* checked_vector(const char* name, const DoubleArray& a, int64_t n) {
  if (a.ndim() != 1 || a.shape(0) != n) {
    std::string shape = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) shape += (i ? ", " : "") + std::to_string(a.shape(i));
    shape += a.ndim() == 1 ? ",)" : ")";
    throw py::value_error(std::string(name) + ": expected a 1-D float64 array of length gh*gw = " +
                          std::to_string(n) + ", got shape " + shape);
  }
  const double* p = a.data();
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(p[i]))
      throw py::value_error(std::string(name) + ": contains NaN or Inf values");
  }
  return p;
}

void check_threshold(const char* name, double v, bool allow_zero) {
  if (!std::isfinite(v) || v < 0.0 || (!allow_zero && v == 0.0))
    throw py::value_error(std::string(name) + ": expected a finite " +
                          (allow_zero ? "non-negative" : "positive") + " number, got " +
                          std::to_string(v));
}

py::array_t<int64_t> union_find_merge_py(const DoubleArray& lam_max, const DoubleArray& lam_min,
                                         const DoubleArray& lightness, int64_t gh, int64_t gw,
                                         double delta_s, double delta_l, double eps) {
  if (gh < 1) throw py::value_error("gh: expected a positive grid height, got " + std::to_string(gh));
  if (gw < 1) throw py::value_error("gw: expected a positive grid width, got " + std::to_string(gw));
  check_threshold("delta_s", delta_s, false);
  check_threshold("delta_l", delta_l, false);
  check_threshold("eps", eps, false);
  const int64_t n = gh * gw;
  const double* pmax = checked_vector("lam_max", lam_max, n);
  const double* pmin = checked_vector("lam_min", lam_min, n);
  const double* plight = checked_vector("lightness", lightness, n);
  py::array_t<int64_t> labels(static_cast<py::ssize_t>(n));
  int64_t* out = labels.mutable_data();
  {
    py::gil_scoped_release release;
    kawhi::union_find_merge(pmax, pmin, plight, gh, gw, delta_s, delta_l, eps, out);
  }
  return labels;
}

bool has_cuda() {
#ifdef KAWHI_WITH_CUDA
  return true;
#else
  return false;
#endif
}

#ifdef KAWHI_WITH_CUDA
py::list split_commas(const std::string& s) {
  py::list out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.append(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}
#endif

py::dict build_info() {
  py::dict info;
  info["compiler"] = KAWHI_CXX_COMPILER;
  info["build_type"] = KAWHI_BUILD_TYPE;
  info["cxx_standard"] = __cplusplus;
  info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                     std::to_string(PYBIND11_VERSION_MINOR) + "." +
                     std::to_string(PYBIND11_VERSION_PATCH);
#ifdef KAWHI_WITH_CUDA
  info["cuda"] = KAWHI_CUDA_VERSION;
  info["cuda_compiler"] = KAWHI_CUDA_COMPILER;
  info["archs"] = split_commas(KAWHI_CUDA_ARCHS);
  info["cuda_runtime"] = "static";
#else
  info["cuda"] = py::none();
  info["cuda_compiler"] = py::none();
  info["archs"] = py::list();
  info["cuda_runtime"] = py::none();
#endif
  return info;
}

// Argument structs of the CUDA ops, exposed field by field (pybind11 type-checks every field:
// a negative pointer or a float size is a TypeError at assignment).
#define KAWHI_FIELD(cls, name) .def_readwrite(#name, &cls::name)

void bind_op_args(py::module_& m) {
  using kawhi::AttentionMassArgs;
  using kawhi::CosineAlignmentArgs;
  using kawhi::SgufDescriptorArgs;
  py::class_<AttentionMassArgs>(m, "AttentionMassArgs",
                                "Raw arguments of attention_mass (see csrc/ops.h).")
      .def(py::init<>())
      KAWHI_FIELD(AttentionMassArgs, q) KAWHI_FIELD(AttentionMassArgs, k)
      KAWHI_FIELD(AttentionMassArgs, dtype) KAWHI_FIELD(AttentionMassArgs, total_q)
      KAWHI_FIELD(AttentionMassArgs, total_k) KAWHI_FIELD(AttentionMassArgs, hq)
      KAWHI_FIELD(AttentionMassArgs, hk) KAWHI_FIELD(AttentionMassArgs, head_dim)
      KAWHI_FIELD(AttentionMassArgs, q_stride_t) KAWHI_FIELD(AttentionMassArgs, q_stride_h)
      KAWHI_FIELD(AttentionMassArgs, k_stride_t) KAWHI_FIELD(AttentionMassArgs, k_stride_h)
      KAWHI_FIELD(AttentionMassArgs, cu_seqlens_q) KAWHI_FIELD(AttentionMassArgs, cu_seqlens_k)
      KAWHI_FIELD(AttentionMassArgs, num_seqs) KAWHI_FIELD(AttentionMassArgs, key_region)
      KAWHI_FIELD(AttentionMassArgs, num_regions) KAWHI_FIELD(AttentionMassArgs, heads)
      KAWHI_FIELD(AttentionMassArgs, num_heads) KAWHI_FIELD(AttentionMassArgs, row_blocks)
      KAWHI_FIELD(AttentionMassArgs, num_row_blocks) KAWHI_FIELD(AttentionMassArgs, lse)
      KAWHI_FIELD(AttentionMassArgs, lse_stride_h) KAWHI_FIELD(AttentionMassArgs, lse_stride_t)
      KAWHI_FIELD(AttentionMassArgs, causal) KAWHI_FIELD(AttentionMassArgs, softmax_scale)
      KAWHI_FIELD(AttentionMassArgs, segmented) KAWHI_FIELD(AttentionMassArgs, num_segments)
      KAWHI_FIELD(AttentionMassArgs, deterministic) KAWHI_FIELD(AttentionMassArgs, out)
      KAWHI_FIELD(AttentionMassArgs, partial)
      KAWHI_FIELD(AttentionMassArgs, segment_block_start)
      KAWHI_FIELD(AttentionMassArgs, segment_blocks) KAWHI_FIELD(AttentionMassArgs, stream)
      KAWHI_FIELD(AttentionMassArgs, device);
  py::class_<CosineAlignmentArgs>(m, "CosineAlignmentArgs",
                                  "Raw arguments of cosine_alignment (see csrc/ops.h).")
      .def(py::init<>())
      KAWHI_FIELD(CosineAlignmentArgs, q) KAWHI_FIELD(CosineAlignmentArgs, k)
      KAWHI_FIELD(CosineAlignmentArgs, dtype) KAWHI_FIELD(CosineAlignmentArgs, total_q)
      KAWHI_FIELD(CosineAlignmentArgs, total_k) KAWHI_FIELD(CosineAlignmentArgs, hq)
      KAWHI_FIELD(CosineAlignmentArgs, hk) KAWHI_FIELD(CosineAlignmentArgs, head_dim)
      KAWHI_FIELD(CosineAlignmentArgs, q_stride_t) KAWHI_FIELD(CosineAlignmentArgs, q_stride_h)
      KAWHI_FIELD(CosineAlignmentArgs, k_stride_t) KAWHI_FIELD(CosineAlignmentArgs, k_stride_h)
      KAWHI_FIELD(CosineAlignmentArgs, cu_seqlens_q)
      KAWHI_FIELD(CosineAlignmentArgs, cu_seqlens_k) KAWHI_FIELD(CosineAlignmentArgs, num_seqs)
      KAWHI_FIELD(CosineAlignmentArgs, key_region) KAWHI_FIELD(CosineAlignmentArgs, num_regions)
      KAWHI_FIELD(CosineAlignmentArgs, heads) KAWHI_FIELD(CosineAlignmentArgs, num_heads)
      KAWHI_FIELD(CosineAlignmentArgs, per_head) KAWHI_FIELD(CosineAlignmentArgs, kbar)
      KAWHI_FIELD(CosineAlignmentArgs, out) KAWHI_FIELD(CosineAlignmentArgs, stream)
      KAWHI_FIELD(CosineAlignmentArgs, device);
  py::class_<SgufDescriptorArgs>(m, "SgufDescriptorArgs",
                                 "Raw arguments of sguf_descriptors (see csrc/ops.h).")
      .def(py::init<>())
      KAWHI_FIELD(SgufDescriptorArgs, image) KAWHI_FIELD(SgufDescriptorArgs, num_images)
      KAWHI_FIELD(SgufDescriptorArgs, height) KAWHI_FIELD(SgufDescriptorArgs, width)
      KAWHI_FIELD(SgufDescriptorArgs, stride_b) KAWHI_FIELD(SgufDescriptorArgs, stride_y)
      KAWHI_FIELD(SgufDescriptorArgs, stride_x) KAWHI_FIELD(SgufDescriptorArgs, stride_c)
      KAWHI_FIELD(SgufDescriptorArgs, grid_h) KAWHI_FIELD(SgufDescriptorArgs, grid_w)
      KAWHI_FIELD(SgufDescriptorArgs, patch) KAWHI_FIELD(SgufDescriptorArgs, lut)
      KAWHI_FIELD(SgufDescriptorArgs, weights) KAWHI_FIELD(SgufDescriptorArgs, radius)
      KAWHI_FIELD(SgufDescriptorArgs, lam_max) KAWHI_FIELD(SgufDescriptorArgs, lam_min)
      KAWHI_FIELD(SgufDescriptorArgs, lightness) KAWHI_FIELD(SgufDescriptorArgs, stream)
      KAWHI_FIELD(SgufDescriptorArgs, device);

  const char* validate_doc =
      "Host-side check of raw op arguments; raises ValueError naming the bad argument. Needs "
      "no GPU (the launchers call it first).";
  m.def("validate", py::overload_cast<const AttentionMassArgs&>(&kawhi::validate), py::arg("args"),
        validate_doc);
  m.def("validate", py::overload_cast<const CosineAlignmentArgs&>(&kawhi::validate),
        py::arg("args"));
  m.def("validate", py::overload_cast<const SgufDescriptorArgs&>(&kawhi::validate),
        py::arg("args"));
  m.def("sguf_shared_bytes", &kawhi::sguf_shared_bytes, py::arg("patch"), py::arg("radius"),
        "Dynamic shared memory (bytes) the SGUF descriptor kernel needs per thread block.");
  py::dict codes;
  codes["float32"] = static_cast<int>(kawhi::kFloat32);
  codes["float16"] = static_cast<int>(kawhi::kFloat16);
  codes["bfloat16"] = static_cast<int>(kawhi::kBFloat16);
  m.attr("DTYPE_CODES") = codes;
  m.attr("MAX_HEAD_DIM") = kawhi::kMaxHeadDim;

#ifdef KAWHI_WITH_CUDA
  using Release = py::call_guard<py::gil_scoped_release>;
  m.def("attention_mass", &kawhi::launch_attention_mass, py::arg("args"), Release(),
        "Launch attention_mass on args.stream (asynchronous). ValueError for bad arguments, "
        "RuntimeError naming the kernel and the CUDA error when a launch or runtime call fails.");
  m.def("cosine_alignment", &kawhi::launch_cosine_alignment, py::arg("args"), Release(),
        "Launch cosine_alignment on args.stream (asynchronous); errors as attention_mass.");
  m.def("sguf_descriptors", &kawhi::launch_sguf_descriptors, py::arg("args"), Release(),
        "Launch the SGUF descriptor kernel on args.stream (asynchronous); errors as "
        "attention_mass.");
#endif
}

#undef KAWHI_FIELD

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kawhi_kernels native extension (C++/CUDA, independent of torch's C++ ABI)";

  m.def("union_find_merge", &union_find_merge_py, py::arg("lam_max"), py::arg("lam_min"),
        py::arg("lightness"), py::arg("gh"), py::arg("gw"), py::arg("delta_s"),
        py::arg("delta_l"), py::arg("eps"),
        R"doc(SGUF union-find over a gh x gw 4-connected token grid.

lam_max, lam_min, lightness: float64 arrays of length gh*gw (token r*gw + c).
Neighbours p, q merge iff sqrt(dmax^2 + dmin^2) / max(lam_max_p, lam_max_q, eps) < delta_s and
|lightness_p - lightness_q| < delta_l. Returns int64 labels [gh*gw], components numbered
0..C-1 in order of their first token in raster order.)doc");

  m.def("has_cuda", &has_cuda, "True if the module was built with CUDA kernels.");
  m.def("build_info", &build_info,
        "Build facts: compiler, build_type, cxx_standard, pybind11, cuda (version string or "
        "None), cuda_compiler, archs (list of 'sm_XX' SASS and 'compute_XX' PTX targets), "
        "cuda_runtime.");
#ifdef KAWHI_WITH_CUDA
  m.def("cuda_runtime_version", &kawhi::cuda_runtime_version,
        "cudaRuntimeGetVersion of the statically linked runtime (e.g. 13000), -1 on failure.");
  m.def("cuda_driver_version", &kawhi::cuda_driver_version,
        "cudaDriverGetVersion (0 when no driver is installed, -1 on failure).");
  m.def("cuda_device_count", &kawhi::cuda_device_count,
        "Number of CUDA devices this module's (statically linked) runtime can use; RuntimeError "
        "naming cudaGetDeviceCount and the CUDA error when the query fails (no driver, driver "
        "older than the runtime).");
  m.def("cuda_device_capability", &kawhi::cuda_device_capability, py::arg("device"),
        "Compute capability of a device as major * 10 + minor (e.g. 90); RuntimeError on failure.");
#endif
  bind_op_args(m);
  kawhi::bind_sguf_cpu(m);
}
