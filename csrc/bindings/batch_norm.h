// Registers the BatchNorm operations of bnc._core.
#pragma once

#include <pybind11/pybind11.h>

namespace bnc_bindings {
void bind_batch_norm(pybind11::module_& m);
}  // namespace bnc_bindings
