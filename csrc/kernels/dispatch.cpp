#include "kernels/dispatch.h"

#include <atomic>

#if BNC_HAVE_OPENMP
#include <omp.h>
#endif

namespace bnc {
namespace {

std::atomic<const KernelTable*> g_active{nullptr};
std::atomic<int> g_num_threads{0};  // 0: not set, use OpenMP's default

bool cpu_has(const std::string& isa) {
  if (isa == "baseline") return true;
#if BNC_HAVE_X86_ISAS
  __builtin_cpu_init();
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
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

}  // namespace bnc
