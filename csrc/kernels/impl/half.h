// IEEE binary16 <-> binary32 by integer arithmetic, for x86-64 without F16C (the baseline path).
// There GCC turns every _Float16 conversion into a libgcc call per element (__extendhfsf2,
// __truncsfhf2: slow, and only in libgcc >= 12, which pins a wheel to a recent Linux). The
// results are bitwise those of F16C's vcvtph2ps / vcvtps2ph (round to nearest even, a NaN keeps
// its sign and top payload bits and comes out quiet), for every input: tools/check_half.cpp.
// The same functions serve scalars (U = unsigned int) and GCC vectors of unsigned int.
#pragma once

#include <cstdint>

namespace bnc {
namespace BNC_ISA {
namespace {

template <class To, class From>
inline To bits_as(From from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as: sizes differ");
  To to;
  __builtin_memcpy(&to, &from, sizeof(to));
  return to;
}

// float(i) for 0 <= i < 2^31, as float bits (a signed conversion: SSE2 has no unsigned one).
inline unsigned int int_to_float_bits(unsigned int i) {
  return bits_as<unsigned int>(static_cast<float>(static_cast<int>(i)));
}
template <class U>
inline U int_to_float_bits(U i) {
  typedef int VI __attribute__((vector_size(sizeof(U))));
  typedef float VF __attribute__((vector_size(sizeof(U))));
  return bits_as<U>(__builtin_convertvector(bits_as<VI>(i), VF));
}

// float + 0.5f on float bits, for 0 <= bits < 2^31 (finite).
inline unsigned int add_half_to_float_bits(unsigned int u) {
  return bits_as<unsigned int>(bits_as<float>(u) + 0.5f);
}
template <class U>
inline U add_half_to_float_bits(U u) {
  typedef float VF __attribute__((vector_size(sizeof(U))));
  return bits_as<U>(bits_as<VF>(u) + 0.5f);
}

// Each lane: the bits of a binary16 (in its low 16 bits) -> the bits of the float it is (exact).
template <class U>
inline U half_bits_to_float_bits(U h) {
  const U zero{};
  const U sign = (h & 0x8000u) << 16;
  const U magnitude = h & 0x7FFFu;
  const U normal = (magnitude << 13) + (112u << 23);  // exponent bias 15 -> 127
  // Infinity, or a NaN with its payload, made quiet.
  const U quiet = magnitude > 0x7C00u ? zero + 0x400000u : zero;
  const U special = (magnitude << 13) | 0x7F800000u | quiet;
  // A subnormal m·2^-24: float(m) is exact, and 2^-24 moves its exponent down by 24 (no float
  // arithmetic, so a flush-denormals mode cannot change it).
  const U subnormal = magnitude != 0u ? int_to_float_bits(magnitude) - (24u << 23) : zero;
  return sign | (magnitude >= 0x7C00u ? special : magnitude >= 0x400u ? normal : subnormal);
}

// Each lane: float bits -> the bits of the nearest binary16 (ties to even), in the low 16 bits.
template <class U>
inline U float_bits_to_half_bits(U u) {
  const U zero{};
  const U sign = (u >> 16) & 0x8000u;
  const U a = u & 0x7FFFFFFFu;
  const U nan = ((a >> 13) & 0x3FFu) | 0x7E00u;
  // Normal results: drop 13 mantissa bits, rounding to nearest even; a carry out of the mantissa
  // moves the exponent up (to infinity past 65504).
  const U normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // Results below 2^-14: x + 0.5 puts x's multiple of 2^-24 (the binary16 subnormal step) in the
  // low mantissa bits, rounded to nearest even by the addition itself.
  const U small = a < (113u << 23) ? a : zero;
  const U subnormal = add_half_to_float_bits(small) - 0x3F000000u;
  const U magnitude = a > 0x7F800000u       ? nan
                      : a >= 0x47800000u    ? zero + 0x7C00u
                      : a >= (113u << 23)   ? normal
                                            : subnormal;
  return sign | magnitude;
}

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
