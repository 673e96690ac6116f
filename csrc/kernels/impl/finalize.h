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
template <class T>
void choose_pivots(const T* x, const Geometry& g, double* shifts) {
  using C = Compute<T>;
  const int64_t samples = min64(kPivotSamples, g.per_channel());
  for (int64_t c = 0; c < g.channels; ++c) shifts[c] = 0.0;
  // Sample k of every channel is element (k / inner, k % inner) of it: read row by row.
  for (int64_t k = 0; k < samples; ++k) {
    const T* sample = x + (k / g.inner) * g.channels * g.inner + k % g.inner;
    if (g.inner == 1) {  // a row: contiguous, so the loop vectorizes
      for (int64_t c = 0; c < g.channels; ++c) shifts[c] += static_cast<double>(sample[c]);
    } else {
      for (int64_t c = 0; c < g.channels; ++c)
        shifts[c] += static_cast<double>(sample[c * g.inner]);
    }
  }
  for (int64_t c = 0; c < g.channels; ++c)
    shifts[c] = samples ? static_cast<double>(static_cast<C>(shifts[c] / samples)) : 0.0;
}

// Channel c summed in double, element by element in memory order: for channels whose float
// partial sums lost their squares below float's range (kTinySquares).
template <class Terms>
void channel_sums_in_double(const Terms& terms, const Geometry& g, int64_t c, double shift,
                            double& sum_a, double& sum_b) {
  double a = 0.0, b = 0.0;
  for (int64_t o = 0; o < g.outer; ++o) {
    const int64_t segment = (o * g.channels + c) * g.inner;
    for (int64_t i = 0; i < g.inner; ++i) terms.one(segment + i, shift, a, b);
  }
  sum_a = a;
  sum_b = b;
}

// Pivoted sums of channels [c0, c1) -> mean[c] and (biased) var[c]. Returns false, unless `last`,
// when some channel's pivot lies more than kRepivotStds standard deviations from its mean
// (Q/n - (S/n)^2 would cancel digits): its shift is moved to the mean and the caller sums the
// channel again.
template <class T>
struct MomentsFinalize {
  const Plan& p;
  const MomentTerms<T>& terms;
  double* shifts;
  double* mean;
  double* var;
  bool operator()(int64_t c0, int64_t c1, const double* sums_d, const double* sums_dd,
                  bool last) const {
    using C = Compute<T>;
    const double n = static_cast<double>(p.g.per_channel());
    bool final_sums = true;
    for (int64_t c = c0; c < c1; ++c) {
      double sum_d = sums_d[c - c0], sum_dd = sums_dd[c - c0];
      if (kFloatPartials<MomentTerms<T>> && p.row_family && sum_dd < kTinySquares * n &&
          !(sum_dd == 0.0 && sum_d == 0.0))
        channel_sums_in_double(terms, p.g, c, shifts[c], sum_d, sum_dd);
      const double mean_offset = sum_d / n;
      double v = sum_dd / n - mean_offset * mean_offset;
      if (!last && mean_offset * mean_offset > kRepivotStds * kRepivotStds * v) {
        // A number of the compute type, so float partial sums stay exact in their shift.
        shifts[c] = static_cast<double>(static_cast<C>(shifts[c] + mean_offset));
        final_sums = false;
        continue;
      }
      if (v < 0.0) v = 0.0;  // rounding only; NaN passes through
      mean[c] = shifts[c] + mean_offset;
      var[c] = v;
    }
    return final_sums;
  }
};

// The backward map's coefficients for channel c (GradTrainMap): a = invstd * weight,
// g = invstd * sum_dy_xmu / n, k = sum_dy / n. The map subtracts mean_c, the mean rounded to the
// compute type; a mean that is not such a number (float64 statistics of float32 data) moves its
// remainder into k.
template <class C>
inline void set_grad_train(C* const* k, int64_t c, double mean, double invstd, double weight,
                           double sum_dy, double sum_dy_xmu, double n) {
  const C mean_c = static_cast<C>(mean);
  const double g = invstd * sum_dy_xmu / n;
  double shift = sum_dy / n;
  if (static_cast<double>(mean_c) != mean)
    shift += (static_cast<double>(mean_c) - mean) * invstd * g;
  k[0][c] = static_cast<C>(invstd * weight);
  k[1][c] = mean_c;
  k[2][c] = static_cast<C>(invstd);
  k[3][c] = static_cast<C>(g);
  k[4][c] = static_cast<C>(shift);
}

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
