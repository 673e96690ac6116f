// The operations: the fused calls (training and inference forward, backward) and the
// split-phase building blocks (statistics; apply with given statistics; backward sums; backward
// apply). Each is a reduce and/or an apply of the same loops (schedule.h, apply.h) with the same
// finalize steps (finalize.h), so a fused call and its blocks composed agree bit for bit where
// their arithmetic is the same (docs/numerics.md).
#pragma once

#include "kernels/impl/finalize.h"

namespace bnc {
namespace BNC_ISA {
namespace {

template <class T, class P>
int64_t forward_train(const T* x, T* y, Geometry g, const P* weight, const P* bias, double eps,
                      double momentum, P* running_mean, P* running_var, P* save_mean,
                      P* save_invstd, int num_threads) {
  using C = Compute<T>;
  const Plan p = make_plan(g, sizeof(T));
  const int threads = threads_for(p, sizeof(T), num_threads);
  ApplyState<T, NormalizeMap<T>::kCoefs> st;
  if (!st.allocate(p, threads, 4)) return -1;
  double* mean = st.ws.template take<double>(g.channels);
  double* var = st.ws.template take<double>(g.channels);
  double* scaled_var = st.ws.template take<double>(g.channels);
  double* invstd = st.ws.template take<double>(g.channels);
  choose_pivots(x, g, st.shifts);
  const MomentTerms<T> terms{x};
  const MomentsFinalize<T> moments{p, terms, st.shifts, mean, var, scaled_var};
  C* const* coefs = st.coefs;
  auto finalize = [&](int64_t c0, int64_t c1, const double* sums_d, const double* sums_dd,
                      bool last) {
    if (!moments(c0, c1, sums_d, sums_dd, last)) return false;
    inverse_stds(c0, c1, var, scaled_var, eps, invstd);
    for (int64_t c = c0; c < c1; ++c) {
      save_mean[c] = static_cast<P>(mean[c]);
      save_invstd[c] = static_cast<P>(invstd[c]);
      set_batch_norm(coefs, c, mean[c], invstd[c], weight, bias);
    }
    return true;
  };
  run_schedule(p, terms, finalize, NormalizeMap<T>{x, y}, st, threads);

  const double n = static_cast<double>(g.per_channel());
  int64_t skipped = 0;
  const double unbias = n / (n - 1.0);
  for (int64_t c = 0; c < g.channels; ++c) {
    if (!is_finite(mean[c]) || !is_finite(var[c])) {
      ++skipped;
      continue;
    }
    if (running_mean)
      running_mean[c] = static_cast<P>((1.0 - momentum) * static_cast<double>(running_mean[c]) +
                                       momentum * mean[c]);
    if (running_var)
      running_var[c] = static_cast<P>((1.0 - momentum) * static_cast<double>(running_var[c]) +
                                      momentum * var[c] * unbias);
  }
  return skipped;
}

// Statistics alone: the training forward's reduce and moments, nothing applied. m2 = n * var.
template <class T>
int64_t stats(const T* x, Geometry g, double* mean, double* m2, int num_threads) {
  const Plan p = make_plan(g, sizeof(T));
  const int threads = threads_for(p, sizeof(T), num_threads);
  ApplyState<T, NoMap::kCoefs> st;
  if (!st.allocate(p, threads, 2)) return -1;
  double* var = st.ws.template take<double>(g.channels);
  double* scaled_var = st.ws.template take<double>(g.channels);
  choose_pivots(x, g, st.shifts);
  const MomentTerms<T> terms{x};
  const MomentsFinalize<T> finalize{p, terms, st.shifts, mean, var, scaled_var};
  run_schedule(p, terms, finalize, NoMap{}, st, threads);
  const double n = static_cast<double>(g.per_channel());
  for (int64_t c = 0; c < g.channels; ++c) m2[c] = n * var[c];
  return 0;
}

template <class T, class P>
int64_t forward_eval(const T* x, T* y, Geometry g, const P* weight, const P* bias,
                     const P* running_mean, const P* running_var, double eps, P* save_mean,
                     P* save_invstd, int num_threads) {
  using C = Compute<T>;
  bool affine = true;
  for (int64_t c = 0; c < g.channels; ++c) {
    const double m = static_cast<double>(running_mean[c]);
    const double invstd = 1.0 / __builtin_sqrt(static_cast<double>(running_var[c]) + eps);
    save_mean[c] = running_mean[c];
    save_invstd[c] = static_cast<P>(invstd);
    affine = affine && __builtin_fabs(m) * invstd <= kAffineMaxMeanOverStd;  // false for NaN
  }
  if (affine) {
    return apply_everywhere<T>(g, AffineMap<T>{x, y}, [&](int64_t c, C* const* k) {
      const double scale = bn_scale(static_cast<double>(save_invstd[c]), weight, c);
      k[0][c] = static_cast<C>(scale);
      k[1][c] = static_cast<C>(bn_shift(bias, c) - static_cast<double>(running_mean[c]) * scale);
    }, num_threads);
  }
  return apply_everywhere<T>(g, NormalizeMap<T>{x, y}, [&](int64_t c, C* const* k) {
    set_batch_norm(k, c, static_cast<double>(running_mean[c]),
                   static_cast<double>(save_invstd[c]), weight, bias);
  }, num_threads);
}

// Apply with given statistics: y = (x - mean) * invstd * weight + bias, the training forward's map
// and coefficients.
template <class T, class P>
int64_t elemt(const T* x, T* y, Geometry g, const double* mean, const double* invstd,
              const P* weight, const P* bias, int num_threads) {
  using C = Compute<T>;
  return apply_everywhere<T>(g, NormalizeMap<T>{x, y}, [&](int64_t c, C* const* k) {
    set_batch_norm(k, c, mean[c], invstd[c], weight, bias);
  }, num_threads);
}

// Shifts for the backward sums: the mean rounded to the compute type (float partial sums hold
// their shift exactly). Returns whether any channel's mean is not such a number.
template <class T, class M>
bool grad_shifts(const M* mean, int64_t channels, double* shifts) {
  bool rounded = false;
  for (int64_t c = 0; c < channels; ++c) {
    shifts[c] = static_cast<double>(static_cast<Compute<T>>(mean[c]));
    rounded = rounded || shifts[c] != static_cast<double>(mean[c]);
  }
  return rounded;
}

// Backward sums alone: sum_dy and sum_dy_xmu = sum(dy * (x - mean)), nothing applied.
template <class T>
int64_t backward_reduce(const T* dy, const T* x, Geometry g, const double* mean, double* sum_dy,
                        double* sum_dy_xmu, int num_threads) {
  const Plan p = make_plan(g, sizeof(T));
  const int threads = threads_for(p, sizeof(T), num_threads);
  ApplyState<T, NoMap::kCoefs> st;
  if (!st.allocate(p, threads, 0)) return -1;
  const bool rounded = grad_shifts<T>(mean, g.channels, st.shifts);
  auto finalize = [&](int64_t c0, int64_t c1, const double* sums_dy, const double* sums_dy_xmu,
                      bool /*last*/) {
    for (int64_t c = c0; c < c1; ++c) {
      sum_dy[c] = sums_dy[c - c0];
      sum_dy_xmu[c] = sums_dy_xmu[c - c0];
    }
    return true;
  };
  run_schedule(p, GradTerms<T>{dy, x}, finalize, NoMap{}, st, threads);
  // sum(dy * (x - mean)) = sum(dy * (x - shift)) + (shift - mean) * sum(dy).
  if (rounded)
    for (int64_t c = 0; c < g.channels; ++c)
      sum_dy_xmu[c] += (st.shifts[c] - mean[c]) * sum_dy[c];
  return 0;
}

template <class T, class P, class Map>
int64_t backward_with(const Map& map, const T* dy, const T* x, Geometry g, const P* save_mean,
                      const P* save_invstd, const P* weight, P* grad_weight, P* grad_bias,
                      int num_threads) {
  using C = Compute<T>;
  const Plan p = make_plan(g, sizeof(T));
  const int threads = threads_for(p, sizeof(T), num_threads);
  ApplyState<T, Map::kCoefs> st;
  if (!st.allocate(p, threads, 0)) return -1;
  grad_shifts<T>(save_mean, g.channels, st.shifts);  // exact: the saved mean is a P <= C number
  const double n = static_cast<double>(g.per_channel());
  C* const* coefs = st.coefs;
  auto finalize = [&](int64_t c0, int64_t c1, const double* sums_dy, const double* sums_dy_xmu,
                      bool /*last*/) {
    for (int64_t c = c0; c < c1; ++c) {
      const double sum_dy = sums_dy[c - c0], sum_dy_xmu = sums_dy_xmu[c - c0];
      const double invstd = static_cast<double>(save_invstd[c]);
      const double w = weight ? static_cast<double>(weight[c]) : 1.0;
      grad_bias[c] = static_cast<P>(sum_dy);
      grad_weight[c] = static_cast<P>(sum_dy_xmu * invstd);
      if constexpr (Map::kInputs == 2)
        set_grad_coefs<Map>(coefs, c, st.shifts[c], invstd, w, sum_dy, sum_dy_xmu, n);
      else
        coefs[0][c] = static_cast<C>(invstd * w);
    }
    return true;  // the shift is the saved mean: no outlier pivot to move away from
  };
  run_schedule(p, GradTerms<T>{dy, x}, finalize, map, st, threads);
  return 0;
}

template <class T, class P>
int64_t backward(const T* dy, const T* x, T* dx, Geometry g, const P* save_mean,
                 const P* save_invstd, const P* weight, bool training, P* grad_weight,
                 P* grad_bias, int num_threads) {
  if (training && grad_train_in_range<Compute<T>>(save_invstd, weight, g.channels))
    return backward_with(GradTrainMap<T>{dy, x, dx}, dy, x, g, save_mean, save_invstd, weight,
                         grad_weight, grad_bias, num_threads);
  if (training)
    return backward_with(GradTrainWideMap<T>{dy, x, dx}, dy, x, g, save_mean, save_invstd,
                         weight, grad_weight, grad_bias, num_threads);
  return backward_with(GradEvalMap<T>{dy, dx}, dy, x, g, save_mean, save_invstd, weight,
                       grad_weight, grad_bias, num_threads);
}

// Backward apply with given sums (over every part of a batch of `count` elements per channel).
template <class Map, class T, class P>
int64_t backward_elemt_with(const Map& map, Geometry g, const double* mean, const double* invstd,
                            const P* weight, const double* sum_dy, const double* sum_dy_xmu,
                            double count, int num_threads) {
  using C = Compute<T>;
  return apply_everywhere<T>(g, map, [&](int64_t c, C* const* k) {
    set_grad_coefs<Map>(k, c, mean[c], invstd[c], weight ? static_cast<double>(weight[c]) : 1.0,
                        sum_dy[c], sum_dy_xmu[c], count);
  }, num_threads);
}

template <class T, class P>
int64_t backward_elemt(const T* dy, const T* x, T* dx, Geometry g, const double* mean,
                       const double* invstd, const P* weight, const double* sum_dy,
                       const double* sum_dy_xmu, double count, int num_threads) {
  // The same choice of map as the fused backward's, so that both give the same bits.
  if (grad_train_in_range<Compute<T>>(invstd, weight, g.channels))
    return backward_elemt_with<GradTrainMap<T>, T>(GradTrainMap<T>{dy, x, dx}, g, mean, invstd,
                                                   weight, sum_dy, sum_dy_xmu, count,
                                                   num_threads);
  return backward_elemt_with<GradTrainWideMap<T>, T>(GradTrainWideMap<T>{dy, x, dx}, g, mean,
                                                     invstd, weight, sum_dy, sum_dy_xmu, count,
                                                     num_threads);
}

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
