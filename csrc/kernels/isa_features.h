// The CPU features each ISA path needs, defined once for the build and the run-time check:
// CMakeLists.txt turns each feature into the -m<feature> flag of isa_<name>.cpp, that file
// refuses to compile without the matching predefined macro (a mismatch is a build error), and
// dispatch.cpp asks the CPU for every feature before it picks the path (never a SIGILL).
// F(feature, the macro the compiler predefines when it may use it)
#pragma once

#define BNC_ISA_FEATURES_avx2(F) F(avx2, __AVX2__) F(fma, __FMA__) F(f16c, __F16C__)

#define BNC_ISA_FEATURES_avx512(F)                                                        \
  F(avx512f, __AVX512F__) F(avx512vl, __AVX512VL__) F(avx512bw, __AVX512BW__)             \
  F(avx512dq, __AVX512DQ__) F(avx2, __AVX2__) F(fma, __FMA__) F(f16c, __F16C__)

// In isa_<name>.cpp: a static_assert per feature that its macro is defined (an undefined macro
// stays an identifier, whose spelling starts with '_'; a defined one expands to 1).
#define BNC_FEATURE_STR2(m) #m
#define BNC_FEATURE_STR(m) BNC_FEATURE_STR2(m)
#define BNC_REQUIRE_FEATURE(feature, macro)                                                 \
  static_assert(BNC_FEATURE_STR(macro)[0] != '_',                                        \
                "compiled without -m" #feature ": CMakeLists.txt must set every flag of "   \
                "kernels/isa_features.h");
