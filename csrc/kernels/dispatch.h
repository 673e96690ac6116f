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
// A forked child gets 1 until it calls set_num_threads itself (see install_fork_handler).
int get_num_threads();
void set_num_threads(int n);

// Registers (once; later calls do nothing) the fork handler that makes a forked child's kernels
// run on one thread: libgomp's thread pool does not survive fork, and a child that opens a
// parallel region from a thread that led one before the fork waits forever. Returns
// pthread_atfork's error code, 0 on success.
int install_fork_handler();

}  // namespace bnc
