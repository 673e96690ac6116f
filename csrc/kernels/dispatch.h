// Run-time choice of the kernel table and the thread count. Plain C++17, no Python.
#pragma once

#include <string>
#include <vector>

#include "kernels/batch_norm.h"

namespace bnc {

// ISA paths this CPU can run, best last (always starts with "baseline").
std::vector<std::string> available_isas();

// Chooses the kernel table: `forced` ("" = best available). Returns an error message on failure
// (unknown name, or an ISA this CPU lacks), "" on success.
std::string select_isa(const std::string& forced);
const KernelTable& active_kernels();

bool have_openmp();
// Threads the kernels use: set_num_threads(n) if called with n >= 1, else OpenMP's default
// (OMP_NUM_THREADS or the number of cores).
int get_num_threads();
void set_num_threads(int n);

}  // namespace bnc
