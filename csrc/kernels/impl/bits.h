// Masks as bits: the ReLU backward's y > 0, kept between its reduce and its apply (one bit per
// element, 1/32 of y's bytes for float32), so that the apply need not read y again.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/impl/simd.h"

namespace bnc {
namespace BNC_ISA {
namespace {

// Bit l set when lane l of v is > 0 (not for NaN: a NaN y masks, as in the y > 0 select).
template <class V>
inline uint32_t positive_bits(V v) {
  constexpr int64_t kN = sizeof(V) / sizeof(v[0]);
  constexpr bool kFloat = sizeof(v[0]) == 4;
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && kFloat)
    return _mm512_cmp_ps_mask((__m512)v, _mm512_setzero_ps(), _CMP_GT_OQ);
  if constexpr (sizeof(V) == 64)
    return _mm512_cmp_pd_mask((__m512d)v, _mm512_setzero_pd(), _CMP_GT_OQ);
#endif
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32 && kFloat)
    return static_cast<uint32_t>(
        _mm256_movemask_ps(_mm256_cmp_ps((__m256)v, _mm256_setzero_ps(), _CMP_GT_OQ)));
  if constexpr (sizeof(V) == 32)
    return static_cast<uint32_t>(
        _mm256_movemask_pd(_mm256_cmp_pd((__m256d)v, _mm256_setzero_pd(), _CMP_GT_OQ)));
#endif
#if defined(__x86_64__)
  if constexpr (sizeof(V) == 16 && kFloat)
    return static_cast<uint32_t>(_mm_movemask_ps(_mm_cmpgt_ps((__m128)v, _mm_setzero_ps())));
  if constexpr (sizeof(V) == 16)
    return static_cast<uint32_t>(_mm_movemask_pd(_mm_cmpgt_pd((__m128d)v, _mm_setzero_pd())));
#endif
  uint32_t bits = 0;
  for (int64_t l = 0; l < kN; ++l) bits |= static_cast<uint32_t>(v[l] > 0) << l;
  return bits;
}

// The lanes of a vector like V whose bit is set, as a condition for a vector select.
template <class V>
inline auto lanes_of(uint32_t bits) {
  using Lanes = decltype(V{} > V{});  // integer lanes of V's width
  Lanes lane_bit;
  for (int64_t l = 0; l < static_cast<int64_t>(sizeof(V) / sizeof(lane_bit[0])); ++l)
    lane_bit[l] = static_cast<decltype(lane_bit[0] + 0)>(int64_t{1} << l);
  return (broadcast<Lanes>(bits) & lane_bit) != 0;
}

// `count` (at most 16) bits from bit `off` on. Only the bytes that hold them are read: a byte
// beyond may belong to another task's piece, which another thread may be writing (or lie past
// the buffer's end).
inline uint32_t load_bits(const uint8_t* bits, int64_t off, int count) {
  const uint8_t* const at = bits + (off >> 3);
  const int shift = static_cast<int>(off & 7);
  uint32_t word = at[0];
  if (shift + count > 8) word |= static_cast<uint32_t>(at[1]) << 8;
  if (shift + count > 16) word |= static_cast<uint32_t>(at[2]) << 16;
  return (word >> shift) & ((uint32_t{1} << count) - 1);
}

// Writes `count` bits (a power of two up to 16) at bit `off`, a multiple of count: inside one
// byte below 8, whole bytes from 8. The byte's other bits belong to the same row piece (the
// caller's alignment), so no other thread writes them meanwhile.
inline void store_bits(uint8_t* bits, int64_t off, uint32_t value, int count) {
  uint8_t* const at = bits + (off >> 3);
  if (count == 16) {
    const uint16_t v = static_cast<uint16_t>(value);
    std::memcpy(at, &v, sizeof(v));
  } else if (count == 8) {
    *at = static_cast<uint8_t>(value);
  } else {
    const int shift = static_cast<int>(off & 7);
    const uint32_t m = ((uint32_t{1} << count) - 1) << shift;
    *at = static_cast<uint8_t>((*at & ~m) | ((value << shift) & m));
  }
}

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
