// Registers bnc._core's run-time functions: ISA choice, threads, the streaming threshold, copy.
#pragma once

#include <pybind11/pybind11.h>

namespace bnc_bindings {
void bind_runtime(pybind11::module_& m);
}  // namespace bnc_bindings
