// The per-channel finalize steps between a reduce and an apply, shared by the fused operations
// and the split-phase building blocks: pivots and sums -> mean and variance (forward), and sums ->
// the backward map's coefficients. One definition each, so that both give the same bits.
#pragma once

#include "kernels/impl/schedule.h"

namespace bnc {
namespace BNC_ISA {
namespace {

// The pivot of each channel: the mean of its first kPivotSamples elements, a number of the
// compute type (so that float partial sums hold it exactly). A single element can lie a few
// standard deviations from the mean, and the rounding of float partial sums grows with the
// square of that distance; the mean of 8 typically lies a third of one away.
// The pivots of channels [c0, c1) to shifts[c - c0].
template <class T>
struct ChoosePivots {
  const T* x;
  Geometry g;
  void operator()(int64_t c0, int64_t c1, double* shifts) const {
    using C = Compute<T>;
    const int64_t samples = min64(kPivotSamples, g.per_channel());
    const int64_t n = c1 - c0;
    // Samples are summed divided by 8 (exact: a power of two), so that the sum of 8 values near
    // the top of the float64 range does not overflow; the pivot's bits are those of the plain
    // sum.
    constexpr double kEighth = 0.125;
    for (int64_t j = 0; j < n; ++j) shifts[j] = 0.0;
    // Sample k of every channel is element (k / inner, k % inner) of it: read row by row.
    for (int64_t k = 0; k < samples; ++k) {
      const T* sample = x + ((k / g.inner) * g.channels + c0) * g.inner + k % g.inner;
      if (g.inner == 1) {  // a row: contiguous, vectorized (float16 has no scalar conversion)
        int64_t j = 0;
        for (; j + kDoublesPerVec <= n; j += kDoublesPerVec)
          store(shifts + j, load<vd>(shifts + j) + load_vd(sample + j) * kEighth);
        for (; j < n; ++j) shifts[j] += static_cast<double>(widen(sample[j])) * kEighth;
      } else {
        for (int64_t j = 0; j < n; ++j)
          shifts[j] += static_cast<double>(widen(sample[j * g.inner])) * kEighth;
      }
    }
    for (int64_t j = 0; j < n; ++j)
      shifts[j] = samples ? static_cast<double>(static_cast<C>(shifts[j] / samples / kEighth)) : 0.0;
  }
};

// The backward's shifts: the mean rounded to the compute type (float partial sums hold their
// shift exactly).
template <class T, class M>
struct MeanShifts {
  const M* mean;
  void operator()(int64_t c0, int64_t c1, double* shifts) const {
    for (int64_t c = c0; c < c1; ++c)
      shifts[c - c0] = static_cast<double>(static_cast<Compute<T>>(mean[c]));
  }
};

// Channel c summed with every term scaled by kOverflowScale (a power of two: exact), for float64
// data whose squares or differences overflow: sums of d * s and (d * s)^2, d = x - shift.
template <class T>
void channel_sums_scaled(const T* x, const Geometry& g, int64_t c, double shift, double& sum_a,
                         double& sum_b) {
  const double s = kOverflowScale;
  double a = 0.0, b = 0.0;
  for (int64_t o = 0; o < g.outer; ++o) {
    const T* segment = x + (o * g.channels + c) * g.inner;
    for (int64_t i = 0; i < g.inner; ++i) {
      const double d = static_cast<double>(widen(segment[i])) * s - shift * s;
      a += d;
      b += d * d;
    }
  }
  sum_a = a;
  sum_b = b;
}

// Pivoted sums of a range's channels -> mean[j] and (biased) var[j] (j = c - c0). Returns false,
// unless `last`, when some channel's pivot lies more than kRepivotStds standard deviations from
// its mean (Q/n - (S/n)^2 would cancel digits): its shift is moved to the mean and the caller sums
// the channel again. A channel whose sums overflowed (float64 data beyond ~1e152) is summed again
// scaled: var[j] is then its variance where representable (else inf, and its running statistics
// are skipped), and scaled_var[j] the variance times kOverflowScale^2 (NaN for other channels).
template <class T>
struct MomentsFinalize {
  const Plan& p;
  const MomentTerms<T>& terms;
  template <int K>
  bool operator()(const ChannelRange<T, K>& r, double* mean, double* var, double* scaled_var,
                  bool last) const {
    using C = Compute<T>;
    const double n = static_cast<double>(p.g.per_channel());
    const int64_t c0 = r.c0;
    const int64_t count = r.c1 - c0;
    double* const shifts = r.shifts;
    // The common case first, in a loop that vectorizes (per channel this was most of a small
    // tensor's forward): no channel to re-pivot and (float64) no sums to redo scaled. Then every
    // channel's results are those of the loop below with scale 1, bit for bit.
    int special = 0;
    constexpr double kRepivot2 = kRepivotStds * kRepivotStds;
    const int check_pivots = last ? 0 : 1;
    for (int64_t j = 0; j < count; ++j) {
      const double sum_d = r.sums_a[j], sum_dd = r.sums_b[j];
      const double mean_offset = sum_d / n;
      const double v = sum_dd / n - mean_offset * mean_offset;
      if (sizeof(C) == 8)  // not finite: x - x is NaN
        special |= static_cast<int>(sum_d - sum_d != 0.0) | static_cast<int>(sum_dd - sum_dd != 0.0);
      special |= check_pivots & static_cast<int>(mean_offset * mean_offset > kRepivot2 * v);
      mean[j] = shifts[j] + mean_offset;
      var[j] = v < 0.0 ? 0.0 : v;  // rounding only; NaN passes through
      scaled_var[j] = __builtin_nan("");
    }
    if (!special) return true;
    bool final_sums = true;
    for (int64_t j = 0; j < count; ++j) {
      // (Float partial sums whose squares underflowed were summed again in double already, per
      // task: reduce_task.)
      double sum_d = r.sums_a[j], sum_dd = r.sums_b[j];
      double scale = 1.0;  // of the sums
      if (sizeof(C) == 8 && !(is_finite(sum_d) && is_finite(sum_dd))) {
        double a, b;
        channel_sums_scaled(terms.x, p.g, c0 + j, shifts[j], a, b);
        if (is_finite(a) && is_finite(b)) {  // else the data hold a NaN or an infinity
          sum_d = a;
          sum_dd = b;
          scale = kOverflowScale;
        }
      }
      const double mean_offset = sum_d / n;
      double v = sum_dd / n - mean_offset * mean_offset;
      if (!last && mean_offset * mean_offset > kRepivot2 * v) {
        // A number of the compute type, so float partial sums stay exact in their shift.
        shifts[j] = static_cast<double>(static_cast<C>(shifts[j] + mean_offset / scale));
        final_sums = false;
        continue;
      }
      if (v < 0.0) v = 0.0;  // rounding only; NaN passes through
      mean[j] = shifts[j] + mean_offset / scale;
      var[j] = v / scale / scale;  // scale * scale would underflow
      scaled_var[j] = scale == 1.0 ? __builtin_nan("") : v;
    }
    return final_sums;
  }
};

// 1 / sqrt(var + eps) of n channels; for a channel summed scaled, from its scaled variance (its
// variance may not be representable when its normalized values are).
inline void inverse_stds(int64_t n, const double* var, const double* scaled_var, double eps,
                         double* invstd) {
  // Square roots and divisions, the slowest instructions here, in a loop of their own: it
  // vectorizes.
  for (int64_t j = 0; j < n; ++j) invstd[j] = 1.0 / __builtin_sqrt(var[j] + eps);
  for (int64_t j = 0; j < n; ++j) {  // a select, so that it vectorizes too
    const double scaled = kOverflowScale /
                          __builtin_sqrt(scaled_var[j] + eps * kOverflowScale * kOverflowScale);
    invstd[j] = scaled_var[j] == scaled_var[j] ? scaled : invstd[j];  // not NaN: summed scaled
  }
}

// Whether GradTrainMap's b = -a * invstd^2 * sum_dy_xmu / n (a = weight * invstd) stays in range
// for every channel: its double intermediate a * invstd^2 = weight * invstd^3 and, in the compute
// type, b ~ weight * invstd^2 * |dy| must stay 2^24 above the smallest normal number (unless dy
// itself is that small); else the tensor takes GradTrainWideMap. Decided from the statistics and
// weights alone, so that the fused backward and backward_elemt agree.
template <class C, class S, class W>
bool grad_train_in_range(const S* invstd, const W* weight, int64_t channels) {
  constexpr double kComputeLimit = sizeof(C) == 4 ? 0x1p-102 : 0x1p-969;
  constexpr double kDoubleLimit = 0x1p-969;
  for (int64_t c = 0; c < channels; ++c) {
    const double i = static_cast<double>(invstd[c]);
    const double w = weight ? static_cast<double>(weight[c]) : 1.0;
    const double wi2 = __builtin_fabs(w * i * i);
    if (w != 0.0 && (wi2 < kComputeLimit || wi2 * i < kDoubleLimit)) return false;
  }
  return true;
}

// The backward maps' coefficients at k[.][j]. The maps subtract mean_c, the mean rounded to
// the compute type; a mean that is not such a number (float64 statistics of float32 data) moves
// its remainder into the constant term.
template <class C>
inline void set_grad_train(C* const* k, int64_t j, double mean, double invstd, double weight,
                           double sum_dy, double sum_dy_xmu, double n) {
  const double a = invstd * weight;
  const C mean_c = static_cast<C>(mean);
  const double b = -a * invstd * invstd * sum_dy_xmu / n;
  const double shift0 = -a * sum_dy / n;
  // Selects, not branches (here and below): the finalize loops vectorize.
  const double shift = static_cast<double>(mean_c) != mean
                           ? shift0 + b * (static_cast<double>(mean_c) - mean)
                           : shift0;
  k[0][j] = static_cast<C>(a);
  k[1][j] = mean_c;
  k[2][j] = static_cast<C>(b);
  k[3][j] = static_cast<C>(shift);
}

template <class C>
inline void set_grad_train_wide(C* const* k, int64_t j, double mean, double invstd,
                                double weight, double sum_dy, double sum_dy_xmu, double n) {
  const C mean_rounded = static_cast<C>(mean);
  const double g = invstd * sum_dy_xmu / n;
  const double shift0 = sum_dy / n;
  // Near the top of the range x - mean could overflow (mean_within_range): the map then
  // subtracts nothing, and mean * invstd * g moves into k.
  const C mean_c = mean_within_range(mean_rounded) ? mean_rounded : C(0);
  const double shift = static_cast<double>(mean_c) != mean
                           ? shift0 + (static_cast<double>(mean_c) - mean) * invstd * g
                           : shift0;
  k[0][j] = static_cast<C>(invstd * weight);
  k[1][j] = mean_c;
  k[2][j] = static_cast<C>(invstd);
  k[3][j] = static_cast<C>(g);
  k[4][j] = static_cast<C>(shift);
}

// Channel c's coefficients of `Map`, one of the two above.
template <class Map, class C>
inline void set_grad_coefs(C* const* k, int64_t j, double mean, double invstd, double weight,
                           double sum_dy, double sum_dy_xmu, double n) {
  if constexpr (Map::kCoefs == 5)
    set_grad_train_wide(k, j, mean, invstd, weight, sum_dy, sum_dy_xmu, n);
  else
    set_grad_train(k, j, mean, invstd, weight, sum_dy, sum_dy_xmu, n);
}

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
