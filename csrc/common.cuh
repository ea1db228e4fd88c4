// Shared CUDA helpers: error checking that turns every cudaError_t into a C++ exception (a Python
// RuntimeError through pybind11) naming the kernel or runtime call, a device guard, element
// loads in fp32, and warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace kawhi {

// A failed CUDA runtime call or kernel launch.
class CudaError : public std::runtime_error {
 public:
  CudaError(cudaError_t code, const std::string& what)
      : std::runtime_error(what), code_(code) {}
  cudaError_t code() const { return code_; }

 private:
  cudaError_t code_;
};

[[noreturn]] inline void throw_cuda_error(cudaError_t code, const char* context) {
  throw CudaError(code, std::string("kawhi_kernels CUDA error in ") + context + ": " +
                            cudaGetErrorName(code) + " (" + cudaGetErrorString(code) + ")");
}

}  // namespace kawhi

// Evaluate a CUDA runtime call; throw kawhi::CudaError naming `context` when it fails.
#define KAWHI_CUDA_CHECK(expr, context)                          \
  do {                                                           \
    const cudaError_t kawhi_err_ = (expr);                       \
    if (kawhi_err_ != cudaSuccess) ::kawhi::throw_cuda_error(kawhi_err_, context); \
  } while (0)

// After a <<<...>>> launch: report (and clear) a launch error, naming the kernel.
#define KAWHI_CHECK_LAUNCH(kernel_name) KAWHI_CUDA_CHECK(cudaGetLastError(), kernel_name " launch")

namespace kawhi {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Makes `device` current for the scope and restores the previous device afterwards (the caller's
// framework keeps its own notion of the current device on the thread).
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* op) {
    KAWHI_CUDA_CHECK(cudaGetDevice(&previous_), op);
    if (previous_ != device) {
      KAWHI_CUDA_CHECK(cudaSetDevice(device), op);
    } else {
      previous_ = -1;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Element loads, widened to fp32.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Sum over the 32 lanes of a warp (all lanes active). The xor butterfly leaves the bitwise same
// total in every lane (each step adds the same two values, in either order), so lanes can take
// identical control-flow decisions on the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Values of one row of `head_dim` (<= kMaxHeadDim) elements held across a warp: lane l holds
// elements l, l + 32, l + 64, ... (coalesced loads), zero beyond head_dim.
constexpr int kValuesPerLane = 8;  // kMaxHeadDim / kWarpSize

template <typename T>
__device__ __forceinline__ void load_row(const T* row, int64_t head_dim, int lane,
                                         float (&v)[kValuesPerLane]) {
#pragma unroll
  for (int t = 0; t < kValuesPerLane; ++t) {
    const int64_t c = lane + static_cast<int64_t>(t) * kWarpSize;
    v[t] = c < head_dim ? to_float(row[c]) : 0.0f;
  }
}

// Dot product of a warp-held row with `row` (same layout); the total is in every lane.
template <typename T>
__device__ __forceinline__ float warp_dot(const float (&v)[kValuesPerLane], const T* row,
                                          int64_t head_dim, int lane) {
  float acc = 0.0f;
#pragma unroll
  for (int t = 0; t < kValuesPerLane; ++t) {
    const int64_t c = lane + static_cast<int64_t>(t) * kWarpSize;
    if (c < head_dim) acc = fmaf(v[t], to_float(row[c]), acc);
  }
  return warp_sum(acc);
}

// Dispatch a templated callable on a DtypeCode (validated beforehand).
template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}); break;
    case 1: f(__half{}); break;
    case 2: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("dtype: unknown dtype code " + std::to_string(dtype));
  }
}

// Blocks for `n` items of `per_block` each.
inline unsigned blocks_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

}  // namespace kawhi
