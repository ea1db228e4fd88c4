// Fused single-threaded CPU SGUF patch descriptors (binding declared here, defined in sguf_cpu.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace kawhi {

// Adds sguf_descriptors_cpu_u8 to the module.
void bind_sguf_cpu(pybind11::module_& m);

}  // namespace kawhi
