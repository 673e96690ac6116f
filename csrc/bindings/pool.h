// Registers the output pool's blocks (bnc/_pool.py is its Python face and says what it is for).
#pragma once

#include <pybind11/pybind11.h>

namespace bnc_bindings {
void bind_pool(pybind11::module_& m);
}  // namespace bnc_bindings
