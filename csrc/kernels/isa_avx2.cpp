// The kernels compiled for the avx2 instruction set (flags set per file in CMakeLists.txt, from
// kernels/isa_features.h).
#include "kernels/isa_features.h"
BNC_ISA_FEATURES_avx2(BNC_REQUIRE_FEATURE)

#define BNC_ISA avx2
#include "kernels/impl/all.h"

namespace bnc {
const KernelTable& kernel_table_avx2() { return avx2::table(); }
}  // namespace bnc
