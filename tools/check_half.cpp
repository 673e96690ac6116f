// Checks csrc/kernels/impl/half.h against F16C's conversions for every binary16 and every
// float32 input, scalar and vector. Needs an x86-64 CPU with F16C:
//   g++ -std=c++17 -O2 -mf16c -Icsrc tools/check_half.cpp -o /tmp/check_half && /tmp/check_half
#include <immintrin.h>

#include <cstdint>
#include <cstdio>

#define BNC_ISA check_half
#include "kernels/impl/half.h"

using namespace bnc::check_half;
typedef unsigned int vu8 __attribute__((vector_size(32)));

int main() {
  long bad = 0;
  for (unsigned int h = 0; h < 0x10000u; ++h) {
    const unsigned int want = bits_as<unsigned int>(_cvtsh_ss(static_cast<unsigned short>(h)));
    if (half_bits_to_float_bits(h) != want && bad++ < 10) std::printf("widen %04x\n", h);
  }
  for (uint64_t base = 0; base < (uint64_t(1) << 32); base += 8) {
    vu8 u;
    for (int l = 0; l < 8; ++l) u[l] = static_cast<unsigned int>(base + l);
    uint16_t want[8];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(want),
                     _mm256_cvtps_ph(bits_as<__m256>(u), _MM_FROUND_TO_NEAREST_INT));
    const vu8 got = float_bits_to_half_bits(u);
    for (int l = 0; l < 8; ++l) {
      const unsigned int w = want[l];
      if ((got[l] != w || float_bits_to_half_bits(u[l]) != w) && bad++ < 10)
        std::printf("narrow %08x: %04x, want %04x\n", u[l], got[l], w);
    }
  }
  std::printf("%s: %ld mismatches\n", bad ? "FAILED" : "ok", bad);
  return bad != 0;
}
