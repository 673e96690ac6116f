// The kernels compiled for the avx512 instruction set (flags set per file in CMakeLists.txt, from
// kernels/isa_features.h).
#include "kernels/isa_features.h"
BNC_ISA_FEATURES_avx512(BNC_REQUIRE_FEATURE)

#define BNC_ISA avx512
#include "kernels/impl/all.h"

namespace bnc {
const KernelTable& kernel_table_avx512() { return avx512::table(); }
}  // namespace bnc
