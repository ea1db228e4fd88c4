// Host-side queries about the CUDA runtime this module was built against (statically linked).
#pragma once

namespace kawhi {

// Version of the linked CUDA runtime as cudaRuntimeGetVersion reports it (e.g. 13000 for 13.0),
// or -1 if the query fails.
int cuda_runtime_version();

// Version of the installed CUDA driver (cudaDriverGetVersion), 0 when no driver is installed,
// -1 if the query fails.
int cuda_driver_version();

}  // namespace kawhi
