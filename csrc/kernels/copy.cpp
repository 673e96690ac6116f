// A multi-threaded memcpy: the benchmark's yardstick for memory bandwidth at a given thread count.
#include "kernels/copy.h"

#include <cstring>

#if BNC_HAVE_OPENMP
#include <omp.h>
#endif

namespace bnc {

void parallel_copy(const void* src, void* dst, int64_t bytes, int num_threads) {
  const char* from = static_cast<const char*>(src);
  char* to = static_cast<char*>(dst);
  const int threads = num_threads < 1 ? 1 : num_threads;
#if BNC_HAVE_OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
#if BNC_HAVE_OPENMP
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int64_t tid = 0, nth = 1;
#endif
    const int64_t lines = bytes / 64;
    const int64_t begin = lines * tid / nth * 64;
    const int64_t end = tid + 1 == nth ? bytes : lines * (tid + 1) / nth * 64;
    if (end > begin) std::memcpy(to + begin, from + begin, static_cast<size_t>(end - begin));
  }
  (void)threads;
}

}  // namespace bnc
