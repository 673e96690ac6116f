// Apply maps: each output element from its inputs and per-channel coefficients, in the compute
// type; the coefficients' per-lane layout for short segments.
#pragma once

#include "kernels/batch_norm.h"
#include "kernels/impl/simd.h"
#include "kernels/impl/terms.h"

namespace bnc {
namespace BNC_ISA {
namespace {

// x - mean cannot overflow when |mean| stays below half an ulp of the largest finite number of
// the compute type (the difference then rounds to at most that number). A channel beyond (data
// near the top of the range) takes x * scale + (shift - mean * scale) instead: no difference to
// overflow, at the cost of a few ulps of |mean| * scale, as in PyTorch's form.
template <class C>
inline bool mean_within_range(C mean) {
  constexpr double kSafeMean = sizeof(C) == 4 ? 0x1p102 : 0x1p969;
  return __builtin_fabs(static_cast<double>(mean)) < kSafeMean;
}

// The forward maps' epilogue (ForwardEpilogue): + residual, then ReLU (v < 0 ? 0 : v keeps a
// NaN, as torch's relu does), in the compute type, before the one rounding to T.
template <class T, bool Residual, bool Relu>
struct FwdEpilogue {
  static constexpr int kInputs = Residual ? 1 : 0;
  static Vec<T> vec(Vec<T> v, const T* residual, int64_t off) {
    if constexpr (Residual) v += load_compute(residual + off);
    if constexpr (Relu) v = v < Compute<T>(0) ? Vec<T>{} : v;
    return v;
  }
  static Compute<T> one(Compute<T> v, const T* residual, int64_t off) {
    if constexpr (Residual) v += widen(residual[off]);
    if constexpr (Relu) v = v < Compute<T>(0) ? Compute<T>(0) : v;
    return v;
  }
  static void prefetch(const T* residual, int64_t off, int64_t count) {
    if constexpr (Residual) prefetch_piece(residual + off, count);
  }
};

// Forward: y = (x - mean_hi) * scale + shift_lo, with the mean split into two numbers of the
// compute type (mean_hi + mean_lo = mean to twice their precision): x - mean_hi is exact where
// it matters (x close to a large mean), and the low part is folded into the shift in double.
// y = alpha * x + beta (PyTorch's form) loses digits there. Then the epilogue.
template <class T, bool Residual = false, bool Relu = false>
struct NormalizeMap {
  using C = Compute<T>;
  using Epi = FwdEpilogue<T, Residual, Relu>;
  static constexpr int kCoefs = 3;  // mean_hi, scale, shift_lo
  static constexpr bool kWrites = true;
  static constexpr int kInputs = 1 + Epi::kInputs;
  const T* x;
  T* out;
  const T* residual = nullptr;
  void prefetch(int64_t off, int64_t count) const {
    prefetch_piece(x + off, count);
    Epi::prefetch(residual, off, count);
  }
  Vec<T> vec(int64_t off, const Vec<T>* k) const {
    return Epi::vec((load_compute(x + off) - k[0]) * k[1] + k[2], residual, off);
  }
  C one(int64_t off, const C* k) const {
    return Epi::one((widen(x[off]) - k[0]) * k[1] + k[2], residual, off);
  }
};

// NormalizeMap's coefficients for y = (x - mean) * scale + shift, at k[.][j].
template <class C>
inline void set_normalize(C* const* k, int64_t j, double mean, double scale, double shift) {
  // Out of range (or NaN) the map subtracts nothing: mean - 0 is mean, exactly. No branch, so
  // that the finalize loops vectorize.
  const C mean_hi = static_cast<C>(mean);
  const C subtracted = mean_within_range(mean_hi) ? mean_hi : C(0);
  k[0][j] = subtracted;
  k[1][j] = static_cast<C>(scale);
  k[2][j] = static_cast<C>(shift - (mean - static_cast<double>(subtracted)) * scale);
}

// Channel c's scale invstd * weight and shift bias (weight and bias optional: 1 and 0).
template <class P>
inline double bn_scale(double invstd, const P* weight, int64_t c) {
  return weight ? invstd * static_cast<double>(weight[c]) : invstd;
}
template <class P>
inline double bn_shift(const P* bias, int64_t c) {
  return bias ? static_cast<double>(bias[c]) : 0.0;
}

// NormalizeMap's coefficients for y = (x - mean) * invstd * weight + bias of channel c, at
// k[.][j].
template <class C, class P>
inline void set_batch_norm(C* const* k, int64_t j, double mean, double invstd, const P* weight,
                           const P* bias, int64_t c) {
  set_normalize(k, j, mean, bn_scale(invstd, weight, c), bn_shift(bias, c));
}

// The inputs of the training backward maps: dy (masked) and x, prefetched together.
template <class T, bool Relu, bool Bits>
struct GradInputs {
  const T* dy;
  const T* x;
  T* out;
  MaskedDy<T, Relu, Bits> mask;
  void prefetch(int64_t off, int64_t count) const {
    prefetch_piece(dy + off, count);
    prefetch_piece(x + off, count);
    mask.prefetch(off, count);
  }
};

// Backward, training: dx = a * dy + b * (x - mean) + k, with a = invstd * weight,
// b = -a * invstd^2 * sum(dy * (x - mean)) / n and k = -a * sum(dy) / n. The mean is a number of
// the compute type (float for float32 and float16 data), so x - mean is exact where it matters.
// For tensors whose a * invstd stays well inside the range (grad_train_in_range).
template <class T, bool Relu = false, bool Bits = false>
struct GradTrainMap : GradInputs<T, Relu, Bits> {
  using GradInputs<T, Relu, Bits>::dy;
  using GradInputs<T, Relu, Bits>::x;
  using GradInputs<T, Relu, Bits>::mask;
  using C = Compute<T>;
  static constexpr int kCoefs = 4;  // a, mean, b, k
  static constexpr bool kWrites = true;
  static constexpr int kInputs = 2 + MaskedDy<T, Relu, Bits>::kApplyInputs;
  Vec<T> vec(int64_t off, const Vec<T>* k) const {
    return k[0] * mask.vec(dy, off) + k[2] * (load_compute(x + off) - k[1]) + k[3];
  }
  C one(int64_t off, const C* k) const {
    return k[0] * mask.one(dy, off) + k[2] * (widen(x[off]) - k[1]) + k[3];
  }
};

// Backward, training, for any scale: dx = a * ((dy - k) - ((x - mean) * invstd) * g), with
// k = sum(dy) / n and g = invstd * sum(dy * (x - mean)) / n: every intermediate is of the order of
// dy or of the normalized x, where b above leaves the range (spreads of 1e16 in float32, 1e146 in
// float64). One more coefficient per element.
template <class T, bool Relu = false, bool Bits = false>
struct GradTrainWideMap : GradInputs<T, Relu, Bits> {
  using GradInputs<T, Relu, Bits>::dy;
  using GradInputs<T, Relu, Bits>::x;
  using GradInputs<T, Relu, Bits>::mask;
  using C = Compute<T>;
  static constexpr int kCoefs = 5;  // a, mean, invstd, g, k
  static constexpr bool kWrites = true;
  static constexpr int kInputs = 2 + MaskedDy<T, Relu, Bits>::kApplyInputs;
  Vec<T> vec(int64_t off, const Vec<T>* k) const {
    const Vec<T> normalized = (load_compute(x + off) - k[1]) * k[2];
    return k[0] * ((mask.vec(dy, off) - k[4]) - normalized * k[3]);
  }
  C one(int64_t off, const C* k) const {
    const C normalized = (widen(x[off]) - k[1]) * k[2];
    return k[0] * ((mask.one(dy, off) - k[4]) - normalized * k[3]);
  }
};

// Backward, inference: dx = a * dy (the statistics are constants).
template <class T, bool Relu = false, bool Bits = false>
struct GradEvalMap {
  using C = Compute<T>;
  static constexpr int kCoefs = 1;
  static constexpr bool kWrites = true;
  static constexpr int kInputs = 1 + MaskedDy<T, Relu, Bits>::kApplyInputs;
  const T* dy;
  T* out;
  MaskedDy<T, Relu, Bits> mask;
  void prefetch(int64_t off, int64_t count) const {
    prefetch_piece(dy + off, count);
    mask.prefetch(off, count);
  }
  Vec<T> vec(int64_t off, const Vec<T>* k) const { return k[0] * mask.vec(dy, off); }
  C one(int64_t off, const C* k) const { return k[0] * mask.one(dy, off); }
};

// Inference with statistics near zero: y = x * scale + offset, PyTorch's form, a third of the
// arithmetic of the split-mean form and as accurate while |mean| * invstd is small
// (kAffineMaxMeanOverStd).
template <class T, bool Residual = false, bool Relu = false>
struct AffineMap {
  using C = Compute<T>;
  using Epi = FwdEpilogue<T, Residual, Relu>;
  static constexpr int kCoefs = 2;  // scale, offset
  static constexpr bool kWrites = true;
  static constexpr int kInputs = 1 + Epi::kInputs;
  const T* x;
  T* out;
  const T* residual = nullptr;
  void prefetch(int64_t off, int64_t count) const {
    prefetch_piece(x + off, count);
    Epi::prefetch(residual, off, count);
  }
  Vec<T> vec(int64_t off, const Vec<T>* k) const {
    return Epi::vec(load_compute(x + off) * k[0] + k[1], residual, off);
  }
  C one(int64_t off, const C* k) const {
    return Epi::one(widen(x[off]) * k[0] + k[1], residual, off);
  }
};

// No apply: for the schedules of operations that only reduce.
struct NoMap {
  static constexpr bool kWrites = false;
  static constexpr int kCoefs = 1;
  static constexpr int kInputs = 1;
};

// The coefficients of channels from `origin` on (channel c's k-th at by_channel[k][c - origin]),
// and for inner < kPeriodicBelowInner their per-lane copies: lane j of a row (channels * inner
// elements) holds channel j / inner's coefficients at by_lane[k][j - origin * inner], and the
// arrays of a whole row run kVecElems past it, repeating it, so that a vector starting anywhere
// in a row reads the right coefficients even where it crosses into the next row. Then the map is
// one flat loop with no per-row bookkeeping. With inner == 1 the lanes are the channels: by_lane
// is by_channel. The fused schedule keeps one chunk's coefficients in per-thread scratch (origin:
// the chunk's first channel); the others keep every channel's (origin 0).
template <class T, int K>
struct Coefs {
  Compute<T>* by_channel[K];
  Compute<T>* by_lane[K];
  int64_t origin = 0;
  int64_t width = 0;  // lanes in a row when by_lane is used, else 0
  int64_t inner = 1;
  int64_t lane_capacity = 0;  // entries in each by_lane array
  static bool uses_lanes(const Geometry& g) { return g.inner < kPeriodicBelowInner; }
  // Entries of each by_channel and by_lane array for `channels` channels starting at a row's
  // first (whole rows: the repeated vector past the row; with inner == 1 by_channel holds them).
  static int64_t channel_length(const Geometry& g, int64_t channels) {
    return g.inner == 1 ? channels + kVecElems<T> : channels;
  }
  static int64_t lane_length(const Geometry& g, int64_t channels) {
    return uses_lanes(g) && g.inner > 1 ? channels * g.inner + kVecElems<T> : 0;
  }
  // Points the arrays at storage for `channels` channels (by_lane at by_channel when inner == 1).
  void place(const Geometry& g, int64_t channels, Compute<T>* const* channel_arrays,
             Compute<T>* const* lane_arrays) {
    inner = g.inner;
    width = uses_lanes(g) ? g.channels * g.inner : 0;
    lane_capacity = g.inner == 1 ? channel_length(g, channels) : lane_length(g, channels);
    for (int k = 0; k < K; ++k) {
      by_channel[k] = channel_arrays[k];
      by_lane[k] = g.inner == 1 ? channel_arrays[k] : lane_arrays[k];
    }
  }
  // Copies channel c's coefficients to its lanes (within the arrays' capacity: the repeat past
  // the row exists only where the arrays start at the row's first lane).
  void spread(int64_t c) const {
    if (!width) return;
    if (inner == 1) {  // by_lane is by_channel: only the repeats past the row
      for (int64_t lane = c + width; lane < width + kVecElems<T> && lane - origin < lane_capacity;
           lane += width)
        for (int k = 0; k < K; ++k) by_lane[k][lane - origin] = by_channel[k][c - origin];
      return;
    }
    const int64_t base = origin * inner;
    for (int64_t i = 0; i < inner; ++i)
      for (int64_t lane = c * inner + i; lane < width + kVecElems<T> && lane - base < lane_capacity;
           lane += width)
        for (int k = 0; k < K; ++k) by_lane[k][lane - base] = by_channel[k][c - origin];
  }
};

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
