#include "kernels/dispatch.h"

#include "kernels/isa_features.h"

#include <atomic>
#include <cstdint>
#include <cstdio>

#include <pthread.h>
#include <unistd.h>

#if BNC_HAVE_OPENMP
#include <omp.h>
#endif

namespace bnc {
namespace {

std::atomic<const KernelTable*> g_active{nullptr};
std::atomic<int> g_num_threads{0};  // 0: not set, use OpenMP's default
// The fork child handler may only do what is async-signal-safe: a lock-free store.
static_assert(std::atomic<int>::is_always_lock_free, "g_num_threads must be lock-free");
std::atomic<int64_t> g_stream_threshold{-1};  // -1: not yet read from the cache size

// The L3 cache size this CPU's cores see: sysfs first (what the kernel reports for this core; in
// virtual machines sysconf may report the host's total), then sysconf, else 0.
int64_t l3_cache_bytes() {
  if (std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long long value = 0;
    char unit = 0;
    const int read = std::fscanf(f, "%lld%c", &value, &unit);
    std::fclose(f);
    if (read >= 1 && value > 0)
      return static_cast<int64_t>(value) * (unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : 1);
  }
#ifdef _SC_LEVEL3_CACHE_SIZE
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 > 0) return l3;
#endif
  return 0;
}

int64_t default_stream_threshold() { return l3_bytes() / 4; }

bool cpu_has(const std::string& isa) {
  if (isa == "baseline") return true;
#if BNC_HAVE_X86_ISAS
  __builtin_cpu_init();
#define BNC_CPU_HAS(feature, macro) &&__builtin_cpu_supports(#feature)
  if (isa == "avx2") return true BNC_ISA_FEATURES_avx2(BNC_CPU_HAS);
  if (isa == "avx512") return true BNC_ISA_FEATURES_avx512(BNC_CPU_HAS);
#undef BNC_CPU_HAS
#endif
  return false;
}

const KernelTable* table_for(const std::string& isa) {
  if (isa == "baseline") return &kernel_table_baseline();
#if BNC_HAVE_X86_ISAS
  if (isa == "avx2") return &kernel_table_avx2();
  if (isa == "avx512") return &kernel_table_avx512();
#endif
  return nullptr;
}

const char* const kKnownIsas[] = {"baseline", "avx2", "avx512"};

// Runs in the child, on the forking thread, right after fork: one thread (run_team then opens no
// parallel region, so libgomp's pool, whose threads stayed in the parent, is never waited on).
void on_fork_child() { g_num_threads.store(1, std::memory_order_relaxed); }

}  // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* isa : kKnownIsas)
    if (table_for(isa) && cpu_has(isa)) out.push_back(isa);
  return out;
}

std::string select_isa(const std::string& forced) {
  if (forced.empty()) {
    g_active = table_for(available_isas().back());
    return "";
  }
  bool known = false;
  for (const char* isa : kKnownIsas) known = known || forced == isa;
  if (!known) return "unknown ISA '" + forced + "': expected one of baseline, avx2, avx512";
  if (!table_for(forced)) return "ISA '" + forced + "' is not built into this bnc (not an x86-64 build)";
  if (!cpu_has(forced)) return "this CPU does not support the ISA '" + forced + "'";
  g_active = table_for(forced);
  return "";
}

const KernelTable& active_kernels() {
  const KernelTable* t = g_active.load();
  return t ? *t : kernel_table_baseline();
}

bool have_openmp() { return BNC_HAVE_OPENMP != 0; }

int get_num_threads() {
  const int n = g_num_threads.load();
  if (n > 0) return n;
#if BNC_HAVE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_num_threads(int n) { g_num_threads = n; }

int install_fork_handler() {
  static const int error = pthread_atfork(nullptr, nullptr, &on_fork_child);
  return error;
}

int64_t stream_threshold_bytes() {
  int64_t t = g_stream_threshold.load(std::memory_order_relaxed);
  if (t < 0) {
    t = default_stream_threshold();
    g_stream_threshold.store(t, std::memory_order_relaxed);
  }
  return t;
}

void set_stream_threshold_bytes(int64_t bytes) {
  g_stream_threshold = bytes < 0 ? default_stream_threshold() : bytes;
}

int64_t l3_bytes() {
  static const int64_t bytes = [] {
    const int64_t l3 = l3_cache_bytes();
    return l3 > 0 ? l3 : int64_t{32} << 20;
  }();
  return bytes;
}

}  // namespace bnc
