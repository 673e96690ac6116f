// Vector types of this translation unit's ISA, loads and stores (plain, widening,
// non-temporal), and small integer helpers. Vector code is written with GCC vector extensions;
// the ISA flags of the translation unit decide which instructions they become.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "kernels/impl/half.h"
#include "kernels/impl/params.h"

namespace bnc {
namespace BNC_ISA {
namespace {

// ---------------------------------------------------------------------------------------------
// Native-width vectors of this translation unit's ISA (16, 32 or 64 bytes). Reductions keep 16
// fixed lanes per channel (kLanes), made of kLanes / kDoublesPerVec vectors, so the order of every
// sum is the same on every ISA; elementwise maps use the native width directly.

#if defined(__AVX512F__)
#define BNC_VEC_BYTES 64
#elif defined(__AVX__)
#define BNC_VEC_BYTES 32
#else
#define BNC_VEC_BYTES 16
#endif

typedef double vd __attribute__((vector_size(BNC_VEC_BYTES)));
typedef float vf __attribute__((vector_size(BNC_VEC_BYTES)));
typedef float vf_for_vd __attribute__((vector_size(BNC_VEC_BYTES / 2)));
typedef _Float16 vh_for_vd __attribute__((vector_size(BNC_VEC_BYTES / 4)));
typedef _Float16 vh_for_vf __attribute__((vector_size(BNC_VEC_BYTES / 2)));
typedef unsigned short vb_for_vd __attribute__((vector_size(BNC_VEC_BYTES / 4)));
typedef unsigned short vb_for_vf __attribute__((vector_size(BNC_VEC_BYTES / 2)));
typedef unsigned int vu_for_vd __attribute__((vector_size(BNC_VEC_BYTES / 2)));
typedef unsigned int vu __attribute__((vector_size(BNC_VEC_BYTES)));

// float16 conversions: F16C instructions where the ISA has them (and native ones off x86),
// integer arithmetic on the bits elsewhere (kernels/impl/half.h: the same results).
#if defined(__x86_64__) && !defined(__F16C__)
#define BNC_HALF_BY_BITS 1
#else
#define BNC_HALF_BY_BITS 0
#endif

constexpr int64_t kDoublesPerVec = BNC_VEC_BYTES / 8;
constexpr int64_t kVecsPerLanes = kLanes / kDoublesPerVec;
template <class T>
struct Types;
template <>
struct Types<float> {
  using Compute = float;      // precision of the elementwise maps
  using Vec = vf;             // a vector of the compute type
  using RawForVd = vf_for_vd;  // kDoublesPerVec elements of T
  using RawForVec = vf;        // the elements of T of one Vec
};
template <>
struct Types<double> {
  using Compute = double;
  using Vec = vd;
  using RawForVd = vd;
  using RawForVec = vd;
};
template <>
struct Types<_Float16> {
  using Compute = float;
  using Vec = vf;
  using RawForVd = vh_for_vd;
  using RawForVec = vh_for_vf;
};
template <>
struct Types<bfloat16> {  // the raw types hold the bits
  using Compute = float;
  using Vec = vf;
  using RawForVd = vb_for_vd;
  using RawForVec = vb_for_vf;
};

template <class T>
using Compute = typename Types<T>::Compute;
template <class T>
using Vec = typename Types<T>::Vec;
template <class T>
constexpr int64_t kVecElems = sizeof(Vec<T>) / sizeof(Compute<T>);

// Unaligned views of the vector types. Loads and stores go through these typed pointers (not
// memcpy), so the compiler knows float data cannot alias double accumulators and keeps them in
// registers.
template <class V>
struct Unaligned;
#define BNC_UNALIGNED(V, E)                         \
  template <>                                       \
  struct Unaligned<V> {                             \
    typedef V type __attribute__((aligned(alignof(E)))); \
  };
BNC_UNALIGNED(vd, double)
BNC_UNALIGNED(vf, float)
BNC_UNALIGNED(vf_for_vd, float)
BNC_UNALIGNED(vh_for_vd, _Float16)
BNC_UNALIGNED(vh_for_vf, _Float16)
BNC_UNALIGNED(vb_for_vd, unsigned short)
BNC_UNALIGNED(vb_for_vf, unsigned short)
#undef BNC_UNALIGNED

template <class V, class E>
inline V load(const E* p) {
  return *reinterpret_cast<const typename Unaligned<V>::type*>(p);
}

template <class V, class E>
inline void store(E* p, V v) {
  *reinterpret_cast<typename Unaligned<V>::type*>(p) = v;
}

// kDoublesPerVec elements of T, widened to double.
template <class T>
inline vd load_vd(const T* p) {
  return __builtin_convertvector(load<typename Types<T>::RawForVd>(p), vd);
}
#if defined(__x86_64__) && BNC_VEC_BYTES <= 32
// GCC 12 lowers the float -> double __builtin_convertvector through two half-width conversions;
// one instruction does it. (Not for AVX-512: GCC 12's _mm512_cvtps_pd trips
// -Wmaybe-uninitialized in its own header.)
template <>
inline vd load_vd(const float* p) {
#if BNC_VEC_BYTES == 32
  return reinterpret_cast<vd>(_mm256_cvtps_pd(_mm_loadu_ps(p)));
#else
  return reinterpret_cast<vd>(
      _mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i_u*>(p)))));
#endif
}
#endif

// float16 through float: F16C converts half to float only, and GCC 12 turns a direct half ->
// double vector conversion into a libgcc call per element. (Both steps are exact.)
template <>
inline vd load_vd(const _Float16* p) {
#if BNC_HALF_BY_BITS
  const vu_for_vd u = __builtin_convertvector(load<vb_for_vd>(p), vu_for_vd);
  return __builtin_convertvector((vf_for_vd)half_bits_to_float_bits(u), vd);
#else
  return __builtin_convertvector(__builtin_convertvector(load<vh_for_vd>(p), vf_for_vd), vd);
#endif
}

// bfloat16: the bits widened to the upper half of a float (exact).
template <>
inline vd load_vd(const bfloat16* p) {
  const vu_for_vd u = __builtin_convertvector(load<vb_for_vd>(p), vu_for_vd) << 16;
  return __builtin_convertvector((vf_for_vd)u, vd);  // (a vector cast: the same bits)
}

// kVecElems<T> elements of T, in the compute type.
template <class T>
inline Vec<T> load_compute(const T* p) {
  if constexpr (sizeof(T) == 2 && !__is_same(T, _Float16)) {  // bfloat16
    const vu u = __builtin_convertvector(load<vb_for_vf>(p), vu) << 16;
    return (vf)u;
#if BNC_HALF_BY_BITS
  } else if constexpr (__is_same(T, _Float16)) {
    return (vf)half_bits_to_float_bits(__builtin_convertvector(load<vb_for_vf>(p), vu));
#endif
  } else {
    return __builtin_convertvector(load<typename Types<T>::RawForVec>(p), Vec<T>);
  }
}

// The elements of one Vec rounded to T, as T's raw vector: float to bfloat16 rounds to nearest
// even, and keeps a NaN a NaN (its quiet bit set: dropping the low half could clear every
// mantissa bit).
template <class T>
inline typename Types<T>::RawForVec to_raw(Vec<T> v) {
  if constexpr (sizeof(T) == 2 && !__is_same(T, _Float16)) {  // bfloat16
    const vu u = (vu)v;
    const vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const vu quiet = (u >> 16) | 0x40u;
    const vu bits = v != v ? quiet : rounded;
    return __builtin_convertvector(bits, vb_for_vf);
#if BNC_HALF_BY_BITS
  } else if constexpr (__is_same(T, _Float16)) {
    return (vh_for_vf)__builtin_convertvector(float_bits_to_half_bits((vu)v), vb_for_vf);
#endif
  } else {
    return __builtin_convertvector(v, typename Types<T>::RawForVec);
  }
}

template <class T>
inline void store_compute(T* p, Vec<T> v) {
  store(p, to_raw<T>(v));
}

// One element of T in its compute type (exact), and a compute-type value rounded to T.
template <class T>
inline Compute<T> widen(T v) {
  if constexpr (sizeof(T) == 2 && !__is_same(T, _Float16)) {  // bfloat16
    const unsigned int u = static_cast<unsigned int>(v.bits) << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof(f));
    return f;
  } else if constexpr (__is_same(T, _Float16)) {
    // Not a plain cast: GCC folds float(h) widened on to double into a libgcc call.
#if BNC_HALF_BY_BITS
    return bits_as<float>(half_bits_to_float_bits(unsigned{bits_as<unsigned short>(v)}));
#elif defined(__x86_64__)
    return _cvtsh_ss(bits_as<unsigned short>(v));
#else
    return static_cast<float>(v);
#endif
  } else {
    return static_cast<Compute<T>>(v);
  }
}
template <class T>
inline T narrow(Compute<T> v) {
  if constexpr (sizeof(T) == 2 && !__is_same(T, _Float16)) {  // bfloat16
    unsigned int u;
    __builtin_memcpy(&u, &v, sizeof(u));
    const unsigned int bits = v != v ? (u >> 16) | 0x40u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return T{static_cast<unsigned short>(bits)};
  } else if constexpr (__is_same(T, _Float16)) {
#if BNC_HALF_BY_BITS
    const unsigned int bits = float_bits_to_half_bits(bits_as<unsigned int>(v));
    return bits_as<_Float16>(static_cast<unsigned short>(bits));
#elif defined(__x86_64__)
    return bits_as<_Float16>(static_cast<unsigned short>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)));
#else
    return static_cast<T>(v);
#endif
  } else {
    return static_cast<T>(v);
  }
}

template <class V, class S>
inline V broadcast(S s) {
  V v = {};
  return v + s;
}

// {0, 1, 2, ...}: each lane's index, in the element type C.
template <class V, class C>
inline V iota() {
  C lanes[sizeof(V) / sizeof(C)];
  for (size_t l = 0; l < sizeof(V) / sizeof(C); ++l) lanes[l] = static_cast<C>(l);
  return load<V>(lanes);
}

// v as loaded, in a register: the compiler may not fold its load into a later select. A select
// on a mask of another load (dy masked by y > 0) otherwise becomes a masked load of dy, which
// cannot issue before y has arrived: from memory that serializes the two streams and doubled the
// ReLU backward (docs/tuning.md, "ReLU masks").
template <class V>
inline V in_register(V v) {
  asm("" : "+v"(v));
  return v;
}

// Sum of 16 lanes in a fixed pairwise order.
inline double lane_sum(const double* lanes) {
  double t[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) t[k] = lanes[k];
  for (int64_t width = kLanes / 2; width >= 1; width /= 2)
    for (int64_t k = 0; k < width; ++k) t[k] += t[k + width];
  return t[0];
}

// Software prefetch of a row piece before it is needed: pieces of one chunk are a row apart
// (often several pages), and hardware prefetchers do not follow such jumps. Long pieces are left
template <class T>
inline void prefetch_piece(const T* p, int64_t count) {
  const int64_t bytes = count * static_cast<int64_t>(sizeof(T));
  if (bytes > kPrefetchMaxBytes) return;
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
}

// For the lambdas of hot loops: inlined whatever the inliner's budget says (a call in a vector
// loop spills every vector register and keeps captured arrays in memory).
#define BNC_INLINE __attribute__((always_inline))

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool is_finite(double v) { return __builtin_isfinite(v); }

// Non-temporal stores write an output that is too large to stay in cache straight to memory,
// without first reading its cache lines (a third of the traffic of a streaming map).
template <class V, class E>
inline void stream_store(E* p, V v) {
#if defined(__x86_64__)
  if constexpr (sizeof(V) == 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), reinterpret_cast<__m512i&>(v));
  } else if constexpr (sizeof(V) == 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i&>(v));
  } else if constexpr (sizeof(V) == 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), reinterpret_cast<__m128i&>(v));
  } else {
    store(p, v);
  }
#else
  store(p, v);
#endif
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

template <bool Stream, class T>
inline void put(T* p, Vec<T> v) {
  const auto raw = to_raw<T>(v);
  if constexpr (Stream) {
    stream_store(p, raw);
  } else {
    store(p, raw);
  }
}

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
