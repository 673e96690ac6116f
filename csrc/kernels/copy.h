#pragma once
#include <cstdint>

namespace bnc {
// Copies `bytes` from src to dst (non-overlapping) with `num_threads` threads.
void parallel_copy(const void* src, void* dst, int64_t bytes, int num_threads);
}  // namespace bnc
