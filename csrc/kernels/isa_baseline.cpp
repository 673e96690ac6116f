// The kernels compiled for the baseline instruction set (flags set per file in CMakeLists.txt).
#define BNC_ISA baseline
#include "kernels/impl/all.h"

namespace bnc {
const KernelTable& kernel_table_baseline() { return baseline::table(); }
}  // namespace bnc
