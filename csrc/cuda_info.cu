#include "cuda_info.h"

#include <cuda_runtime_api.h>

namespace kawhi {

int cuda_runtime_version() {
  int version = 0;
  return cudaRuntimeGetVersion(&version) == cudaSuccess ? version : -1;
}

int cuda_driver_version() {
  int version = 0;
  return cudaDriverGetVersion(&version) == cudaSuccess ? version : -1;
}

}  // namespace kawhi
