// Apply maps: each output element from its inputs and per-channel coefficients, in the compute
// type; the coefficients' per-lane layout for short segments.
#pragma once

#include "kernels/batch_norm.h"
#include "kernels/impl/simd.h"

namespace bnc {
namespace BNC_ISA {
namespace {

// x - mean cannot overflow when |mean| stays below half an ulp of the largest finite number of
// the compute type (the difference then rounds to at most that number): beyond, a channel's map
// takes x * 0.5 - mean * 0.5 (exact: a power of two) and doubles its scale instead. Every
// channel pays the multiplication by its `half` (1 almost always: x * 1 is x, bit for bit).
template <class C>
inline C overflow_half(C mean) {
  constexpr C kSafeMean = sizeof(C) == 4 ? static_cast<C>(0x1p102) : static_cast<C>(0x1p969);
  return __builtin_fabs(static_cast<double>(mean)) < static_cast<double>(kSafeMean) ? C(1)
                                                                                     : C(0.5);
}

// Forward: y = (x * half - mean_hi * half) * (scale / half) + shift_lo, with the mean split into
// two numbers of the compute type (mean_hi + mean_lo = mean to twice their precision):
// x - mean_hi is exact where it matters (x close to a large mean), and the low part is folded
// into the shift in double. y = alpha * x + beta (PyTorch's form) loses digits there.
template <class T>
struct NormalizeMap {
  using C = Compute<T>;
  static constexpr int kCoefs = 4;  // mean_hi * half, scale / half, shift_lo, half
  static constexpr bool kWrites = true;
  static constexpr int kInputs = 1;
  const T* x;
  T* out;
  void prefetch(int64_t off, int64_t count) const { prefetch_piece(x + off, count); }
  Vec<T> vec(int64_t off, const Vec<T>* k) const {
    return (load_compute(x + off) * k[3] - k[0]) * k[1] + k[2];
  }
  C one(int64_t off, const C* k) const {
    return (static_cast<C>(x[off]) * k[3] - k[0]) * k[1] + k[2];
  }
};

// Channel c's coefficients of NormalizeMap for y = (x - mean) * scale + shift.
template <class C>
inline void set_normalize(C* const* k, int64_t c, double mean, double scale, double shift) {
  const C mean_hi = static_cast<C>(mean);
  const C half = overflow_half(mean_hi);
  k[0][c] = mean_hi * half;
  k[1][c] = static_cast<C>(scale / static_cast<double>(half));
  k[2][c] = static_cast<C>(shift - (mean - static_cast<double>(mean_hi)) * scale);
  k[3][c] = half;
}

// Backward, training: dx = a * ((dy - k) - ((x * half - mean * half) * (invstd / half)) * g),
// with k = sum(dy) / n and g = invstd * sum(dy * (x - mean)) / n. Every intermediate is of the
// order of dy or of the normalized x, whatever the data's scale: the expanded form
// a * invstd^2 * ... left the range at spreads of 1e20 (float32) or 1e105 (float64). The mean is a
// number of the compute type (float for float32 and float16 data), so x - mean is exact where it
// matters; `half` as in NormalizeMap.
template <class T>
struct GradTrainMap {
  using C = Compute<T>;
  static constexpr int kCoefs = 6;  // a, mean * half, invstd / half, g, k, half
  static constexpr bool kWrites = true;
  static constexpr int kInputs = 2;
  const T* dy;
  const T* x;
  T* out;
  void prefetch(int64_t off, int64_t count) const {
    prefetch_piece(dy + off, count);
    prefetch_piece(x + off, count);
  }
  Vec<T> vec(int64_t off, const Vec<T>* k) const {
    const Vec<T> normalized = (load_compute(x + off) * k[5] - k[1]) * k[2];
    return k[0] * ((load_compute(dy + off) - k[4]) - normalized * k[3]);
  }
  C one(int64_t off, const C* k) const {
    const C normalized = (static_cast<C>(x[off]) * k[5] - k[1]) * k[2];
    return k[0] * ((static_cast<C>(dy[off]) - k[4]) - normalized * k[3]);
  }
};

// Backward, inference: dx = a * dy (the statistics are constants).
template <class T>
struct GradEvalMap {
  using C = Compute<T>;
  static constexpr int kCoefs = 1;
  static constexpr bool kWrites = true;
  static constexpr int kInputs = 1;
  const T* dy;
  T* out;
  void prefetch(int64_t off, int64_t count) const { prefetch_piece(dy + off, count); }
  Vec<T> vec(int64_t off, const Vec<T>* k) const { return k[0] * load_compute(dy + off); }
  C one(int64_t off, const C* k) const { return k[0] * static_cast<C>(dy[off]); }
};

// Inference with statistics near zero: y = x * scale + offset, PyTorch's form, a third of the
// arithmetic of the split-mean form and as accurate while |mean| * invstd is small
// (kAffineMaxMeanOverStd).
template <class T>
struct AffineMap {
  using C = Compute<T>;
  static constexpr int kCoefs = 2;  // scale, offset
  static constexpr bool kWrites = true;
  static constexpr int kInputs = 1;
  const T* x;
  T* out;
  void prefetch(int64_t off, int64_t count) const { prefetch_piece(x + off, count); }
  Vec<T> vec(int64_t off, const Vec<T>* k) const { return load_compute(x + off) * k[0] + k[1]; }
  C one(int64_t off, const C* k) const { return static_cast<C>(x[off]) * k[0] + k[1]; }
};

// No apply: for the schedules of operations that only reduce.
struct NoMap {
  static constexpr bool kWrites = false;
  static constexpr int kCoefs = 1;
  static constexpr int kInputs = 1;
};

// Per-lane coefficients for inner < kPeriodicBelowInner: lane j of a row (channels * inner
// elements) holds channel j / inner's coefficient, and the arrays run kVecElems past the row,
// repeating it, so a vector starting anywhere in a row reads the right coefficients even where
// it crosses into the next row. Then the map is one flat loop with no per-row bookkeeping.
template <class T, int K>
struct LaneCoefs {
  Compute<T>* lanes[K];
  int64_t width = 0;  // 0: not used (inner >= kPeriodicBelowInner)
  int64_t inner = 1;
  static int64_t length(const Geometry& g) {
    return g.inner < kPeriodicBelowInner ? g.channels * g.inner + kVecElems<T> : 0;
  }
  // Copies channel c's coefficients to its lanes.
  void spread(int64_t c, Compute<T>* const* coefs) const {
    if (!width) return;
    for (int64_t i = 0; i < inner; ++i)
      for (int64_t lane = c * inner + i; lane < width + kVecElems<T>; lane += width)
        for (int k = 0; k < K; ++k) lanes[k][lane] = coefs[k][c];
  }
};

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
