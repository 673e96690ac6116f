// Every kernel of one instruction set: isa_<name>.cpp defines BNC_ISA (a namespace name) and
// includes this file, and the compiler flags of that translation unit decide which instructions
// the vector code becomes. Everything lives in an anonymous namespace inside bnc::BNC_ISA and
// uses no inline helpers from other headers (no std:: templates), so no function compiled for
// one ISA can be picked by the linker for another.
//
// Every operation is a per-channel reduction (two sums per channel), a tiny per-channel finalize
// and a per-element map, over a plan cut by the shape alone: see docs/numerics.md for the
// arithmetic, docs/tuning.md for the constants. Files, in include order: params.h simd.h plan.h
// team.h terms.h maps.h workspace.h reduce_rows.h reduce_segments.h apply.h schedule.h
// finalize.h ops.h.
#pragma once

#ifndef BNC_ISA
#error "define BNC_ISA before including kernels/impl/all.h"
#endif

#include "kernels/batch_norm.h"
#include "kernels/impl/ops.h"

namespace bnc {
namespace BNC_ISA {

#define BNC_STR2(s) #s
#define BNC_STR(s) BNC_STR2(s)

template <class T, class P>
constexpr KernelSet<T, P> kernel_set() {
  return {forward_train<T, P>, forward_eval<T, P>, backward<T, P>, stats<T>,
          elemt<T, P>,         backward_reduce<T>, backward_elemt<T, P>};
}

inline const KernelTable& table() {
  static const KernelTable t = {BNC_STR(BNC_ISA), kernel_set<float, float>(),
                                kernel_set<double, double>(), kernel_set<_Float16, float>(),
                                kernel_set<bfloat16, float>()};
  return t;
}

#undef BNC_STR
#undef BNC_STR2

}  // namespace BNC_ISA
}  // namespace bnc
