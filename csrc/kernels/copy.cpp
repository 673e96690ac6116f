// A multi-threaded memcpy: the benchmark's yardstick for memory bandwidth at a given thread count.
#include "kernels/copy.h"

#include <cstdint>
#include <cstring>

#include "kernels/batch_norm.h"

#if defined(__x86_64__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

#if BNC_HAVE_OPENMP
#include <omp.h>
#endif

namespace bnc {
namespace {

// Copies with non-temporal stores (as the kernels write large outputs), so the yardstick moves
// each byte once each way, like the kernels do. The source is prefetched kCopyPrefetchBytes
// ahead, a line at a time: a yardstick must be the fastest copy we know (docs/tuning.md,
// kCopyPrefetchBytes).
constexpr int64_t kCopyPrefetchBytes = 4096;

void stream_copy(const char* from, char* to, int64_t bytes) {
#if defined(__x86_64__)
  int64_t i = 0;
  const int64_t head = (16 - static_cast<int64_t>(reinterpret_cast<uintptr_t>(to) % 16)) % 16;
  if (head > 0) {
    std::memcpy(to, from, static_cast<size_t>(head < bytes ? head : bytes));
    i = head;
  }
  for (; i + 64 + kCopyPrefetchBytes <= bytes; i += 64) {
    _mm_prefetch(from + i + kCopyPrefetchBytes, _MM_HINT_T0);
    for (int k = 0; k < 64; k += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(to + i + k),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i + k)));
  }
  for (; i + 16 <= bytes; i += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(to + i),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i)));
  if (i < bytes) std::memcpy(to + i, from + i, static_cast<size_t>(bytes - i));
  _mm_sfence();
#else
  std::memcpy(to, from, static_cast<size_t>(bytes));
#endif
}

}  // namespace

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
    if (end > begin) {
      if (bytes >= stream_threshold_bytes())
        stream_copy(from + begin, to + begin, end - begin);
      else
        std::memcpy(to + begin, from + begin, static_cast<size_t>(end - begin));
    }
  }
  (void)threads;
}

}  // namespace bnc
