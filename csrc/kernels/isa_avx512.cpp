// The kernels compiled for the avx512 instruction set (flags set per file in CMakeLists.txt).
#define BNC_ISA avx512
#include "kernels/impl/all.h"

namespace bnc {
const KernelTable& kernel_table_avx512() { return avx512::table(); }
}  // namespace bnc
