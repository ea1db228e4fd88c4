#include "cuda_info.h"

#include <cuda_runtime_api.h>

#include "common.cuh"

namespace kawhi {

int cuda_runtime_version() {
  int version = 0;
  return cudaRuntimeGetVersion(&version) == cudaSuccess ? version : -1;
}

int cuda_driver_version() {
  int version = 0;
  return cudaDriverGetVersion(&version) == cudaSuccess ? version : -1;
}

int cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the error state of this runtime
    throw_cuda_error(err, "cudaGetDeviceCount");
  }
  return count;
}

int cuda_device_capability(int device) {
  int major = 0, minor = 0;
  KAWHI_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                   "cudaDeviceGetAttribute(compute capability)");
  KAWHI_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device),
                   "cudaDeviceGetAttribute(compute capability)");
  return major * 10 + minor;
}

}  // namespace kawhi
