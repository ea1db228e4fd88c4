// pybind11 module kawhi_kernels._C.
//
// Independent of torch's C++ ABI on purpose: no torch headers, no libtorch. Arrays arrive as
// numpy arrays (host) or raw pointers; the CUDA runtime, when built in, is linked statically.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mma_layout.h"
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

// Argument structs of the CUDA ops, bound from the op_fields.h tables (pybind11 type-checks
// every field: a negative pointer or a float size is a TypeError at assignment), and the tables
// themselves as _C.op_fields(op), which the Python wrappers fill the structs from.
const char* kind_name(kawhi::FieldKind kind) {
  switch (kind) {
    case kawhi::FieldKind::Pointer: return "pointer";
    case kawhi::FieldKind::Count: return "count";
    case kawhi::FieldKind::Stride: return "stride";
    case kawhi::FieldKind::Flag: return "flag";
    case kawhi::FieldKind::Real: return "real";
    case kawhi::FieldKind::Dtype: return "dtype";
    case kawhi::FieldKind::Stream: return "stream";
    case kawhi::FieldKind::Device: return "device";
  }
  return "unknown";
}

py::dict field_row(const char* name, const char* c_type, kawhi::FieldKind kind, int64_t minimum,
                   const char* doc) {
  py::dict row;
  row["name"] = name;
  row["c_type"] = c_type;
  row["kind"] = kind_name(kind);
  row["minimum"] = minimum;
  row["doc"] = doc;
  return row;
}

#define KAWHI_BIND_FIELD(c_type, name, init, kind, minimum, doc) \
  cls.def_readwrite(#name, &Args::name, doc);
#define KAWHI_FIELD_ROW(c_type, name, init, kind, minimum, doc) \
  rows.append(field_row(#name, #c_type, kawhi::FieldKind::kind, minimum, doc));

#define KAWHI_BIND_ARGS(Struct, TABLE, op_name)                                           \
  {                                                                                       \
    using Args = kawhi::Struct;                                                           \
    py::class_<Args> cls(m, #Struct, "Raw arguments of " op_name " (see csrc/ops.h).");   \
    cls.def(py::init<>());                                                                \
    TABLE(KAWHI_BIND_FIELD)                                                               \
    arg_types[op_name] = cls;                                                             \
  }

// The field table of `op` as a list of dicts (built on each call: no Python state held in C++).
py::list op_fields(const std::string& op) {
  py::list rows;
  if (op == "attention_mass") {
    KAWHI_ATTENTION_MASS_FIELDS(KAWHI_FIELD_ROW)
  } else if (op == "cosine_alignment") {
    KAWHI_COSINE_ALIGNMENT_FIELDS(KAWHI_FIELD_ROW)
  } else if (op == "sguf_descriptors") {
    KAWHI_SGUF_DESCRIPTOR_FIELDS(KAWHI_FIELD_ROW)
  } else if (op == "grid_pyramid") {
    KAWHI_GRID_PYRAMID_FIELDS(KAWHI_FIELD_ROW)
  } else {
    throw py::value_error("op: expected 'attention_mass', 'cosine_alignment', "
                          "'sguf_descriptors' or 'grid_pyramid', got '" + op + "'");
  }
  return rows;
}

void bind_op_args(py::module_& m) {
  using kawhi::AttentionMassArgs;
  using kawhi::CosineAlignmentArgs;
  using kawhi::SgufDescriptorArgs;
  using kawhi::GridPyramidArgs;
  py::dict arg_types;
  KAWHI_BIND_ARGS(AttentionMassArgs, KAWHI_ATTENTION_MASS_FIELDS, "attention_mass")
  KAWHI_BIND_ARGS(CosineAlignmentArgs, KAWHI_COSINE_ALIGNMENT_FIELDS, "cosine_alignment")
  KAWHI_BIND_ARGS(SgufDescriptorArgs, KAWHI_SGUF_DESCRIPTOR_FIELDS, "sguf_descriptors")
  KAWHI_BIND_ARGS(GridPyramidArgs, KAWHI_GRID_PYRAMID_FIELDS, "grid_pyramid")
  m.attr("ARG_TYPES") = arg_types;
  m.def("op_fields", &op_fields, py::arg("op"),
        "Field table of an op's argument struct (csrc/op_fields.h), in declaration order: a "
        "list of dicts with name, c_type, kind (pointer, count, stride, flag, real, dtype, "
        "stream, device), minimum (the least value a count takes) and doc. ARG_TYPES[op] is "
        "the struct's class.");

  const char* validate_doc =
      "Host-side check of raw op arguments; raises ValueError naming the bad argument. Needs "
      "no GPU (the launchers call it first).";
  m.def("validate", py::overload_cast<const AttentionMassArgs&>(&kawhi::validate), py::arg("args"),
        validate_doc);
  m.def("validate", py::overload_cast<const CosineAlignmentArgs&>(&kawhi::validate),
        py::arg("args"));
  m.def("validate", py::overload_cast<const SgufDescriptorArgs&>(&kawhi::validate),
        py::arg("args"));
  m.def("validate", py::overload_cast<const GridPyramidArgs&>(&kawhi::validate),
        py::arg("args"));
  m.def(
      "grid_pyramid_shared_floats",
      [](int64_t rows, int64_t width, const std::vector<int32_t>& sizes) {
        if (rows < 0 || width < 0)
          throw py::value_error("rows/width: expected non-negative sizes, got " +
                                std::to_string(rows) + " x " + std::to_string(width));
        for (int32_t s : sizes)
          if (s < 1)
            throw py::value_error("sizes: cell sizes must be >= 1, got " + std::to_string(s));
        return kawhi::grid_pyramid_shared_floats(rows, width, sizes.data(),
                                                 static_cast<int64_t>(sizes.size()));
      },
      py::arg("rows"), py::arg("width"), py::arg("sizes"),
      "fp32 shared-memory slots a grid_pyramid block needs for a strip of rows x width tokens "
      "and the (ascending, distinct) cell sizes: the strip plus every level's cells.");
  m.attr("MAX_PYRAMID_LEVELS") = kawhi::kMaxPyramidLevels;
  m.attr("MAX_STRIP_TOKENS") = kawhi::kMaxStripTokens;
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
  m.def("grid_pyramid", &kawhi::launch_grid_pyramid, py::arg("args"), Release(),
        "Launch grid_pyramid on args.stream (asynchronous); errors as attention_mass.");
#endif
}

#undef KAWHI_BIND_ARGS
#undef KAWHI_FIELD_ROW
#undef KAWHI_BIND_FIELD

}  // namespace

// The tensor-core kernel's index math (mma_layout.h), for host-side tests.
void bind_mma_layout(py::module_& m) {
  namespace mma = kawhi::mma;
  auto pair = [](mma::RowCol rc) { return py::make_tuple(rc.row, rc.col); };
  py::module_ s = m.def_submodule(
      "mma_layout", "Index math of the tensor-core attention_mass kernel (csrc/mma_layout.h).");
  s.def("c_coord", [pair](int lane, int i) { return pair(mma::c_coord(lane, i)); });
  s.def("a_coord", [pair](int lane, int r, int h) { return pair(mma::a_coord(lane, r, h)); });
  s.def("b_coord", [pair](int lane, int r, int h) { return pair(mma::b_coord(lane, r, h)); });
  s.def("ldmatrix_k_source", [pair](int lane) { return pair(mma::ldmatrix_k_source(lane)); });
  s.def("ldmatrix_fragment", [pair](int lane, int h) { return pair(mma::ldmatrix_fragment(lane, h)); });
  s.def("swizzle_chunk", &mma::swizzle_chunk);
  s.def("visible_keys", &mma::visible_keys);
  s.def("key_tiles_needed", &mma::key_tiles_needed);
  s.def("warp_assignment", [pair](int warp, int spc) { return pair(mma::warp_assignment(warp, spc)); });
  s.def("block_rows_for", &mma::block_rows_for);
  s.def("shared_bytes", &mma::shared_bytes, py::arg("max_d"),
        "Dynamic shared memory (bytes) of the kernel variant with K rows padded to max_d.");
  s.attr("TILE_KEYS") = mma::kTileKeys;
  s.attr("WARP_ROWS") = mma::kWarpRows;
  s.attr("WARPS") = mma::kWarps;
  // The second MMA (region mass) and the scatter columns.
  s.def("p_a_source", [pair](int kc, int r) { return pair(mma::p_a_source(kc, r)); });
  s.def("one_hot_key", &mma::one_hot_key);
  s.def("one_hot_col", &mma::one_hot_col);
  s.def("region_ntiles", &mma::region_ntiles);
  s.def("scatter_column", [](const py::sequence& tile_region, int key) {
    std::vector<int32_t> ids;
    for (const auto& v : tile_region) ids.push_back(v.cast<int32_t>());
    if (key < 0 || key >= static_cast<int>(ids.size())) throw py::value_error("key: outside the tile");
    return mma::scatter_column_host(ids.data(), key);
  });
  s.attr("STAGES") = mma::kStages;
  s.attr("COARSE_MAX_REGIONS") = mma::kCoarseMaxRegions;
  s.attr("MASS_SCALE") = mma::kMassScale;
}

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
  bind_mma_layout(m);
  kawhi::bind_sguf_cpu(m);
}
