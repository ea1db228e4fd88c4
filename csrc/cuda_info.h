// Host-side queries about the CUDA runtime this module was built against (statically linked)
// and the devices it can see.
#pragma once

#include <string>

namespace kawhi {

// Version of the linked CUDA runtime as cudaRuntimeGetVersion reports it (e.g. 13000 for 13.0),
// or -1 if the query fails.
int cuda_runtime_version();

// Version of the installed CUDA driver (cudaDriverGetVersion), 0 when no driver is installed,
// -1 if the query fails.
int cuda_driver_version();

// Number of CUDA devices this module's runtime can use. Throws kawhi::CudaError (naming
// cudaGetDeviceCount and the CUDA error) when the query fails, e.g. without a driver or with a
// driver older than the linked runtime needs.
int cuda_device_count();

// Compute capability of `device` as major * 10 + minor (e.g. 90); throws kawhi::CudaError.
int cuda_device_capability(int device);

}  // namespace kawhi
