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

// Calls f with a function of j: param[c0 + j] as a double, or `absent` (1 for a weight, 0 for a
// bias) without the array, so that a per-channel loop has no branch on the pointer inside.
template <class P, class F>
void with_param(const P* param, int64_t c0, double absent, F&& f) {
  if (param)
    f([=](int64_t j) BNC_INLINE { return static_cast<double>(param[c0 + j]); });
  else
    f([=](int64_t) BNC_INLINE { return absent; });
}

// Calls f with the forward map M<T, residual?, relu?> of the epilogue.
template <template <class, bool, bool> class M, class T, class F>
int64_t with_forward_map(const T* x, T* y, ForwardEpilogue<T> e, F&& f) {
  if (e.residual) {
    if (e.relu) return f(M<T, true, true>{x, y, e.residual});
    return f(M<T, true, false>{x, y, e.residual});
  }
  if (e.relu) return f(M<T, false, true>{x, y, nullptr});
  return f(M<T, false, false>{x, y, nullptr});
}

template <class T, class P, class Map>
int64_t forward_train_with(const Map& map, const T* x, Geometry g, const P* weight, const P* bias,
                           double eps, double momentum, P* running_mean, P* running_var,
                           P* save_mean, P* save_invstd, int num_threads) {
  constexpr int K = Map::kCoefs;
  const Plan p = make_plan(g, sizeof(T));
  const int threads = threads_for(p, sizeof(T), num_threads);
  ApplyState<T, K> st;
  if (!st.allocate(p, threads)) return -1;
  const MomentTerms<T> terms{x};
  const MomentsFinalize<T> moments{p, terms};
  const double n = static_cast<double>(g.per_channel());
  const double unbias = n / (n - 1.0);
  int64_t skipped = 0;
  auto finalize = [&](const ChannelRange<T, K>& r, bool last) {
    double* const mean = r.temps[0];
    double* const var = r.temps[1];
    double* const scaled_var = r.temps[2];
    double* const invstd = r.temps[3];
    if (!moments(r, mean, var, scaled_var, last)) return false;
    const int64_t c0 = r.c0, count = r.c1 - r.c0;
    inverse_stds(count, var, scaled_var, eps, invstd);
    for (int64_t j = 0; j < count; ++j) {
      save_mean[c0 + j] = static_cast<P>(mean[j]);
      save_invstd[c0 + j] = static_cast<P>(invstd[j]);
    }
    // (invstd * 1 is invstd exactly: bn_scale's values without a weight)
    with_param(weight, c0, 1.0, [&](auto weight_of) {
      with_param(bias, c0, 0.0, [&](auto shift_of) {
        for (int64_t j = 0; j < count; ++j)
          set_normalize(r.coefs, j, mean[j], invstd[j] * weight_of(j), shift_of(j));
      });
    });
    // The running statistics here, once per channel (the schedule finalizes each channel once).
    // A channel whose statistics are not finite keeps its running ones (selects, no branch: the
    // loops vectorize).
    auto finite = [&](int64_t j) BNC_INLINE {  // x - x is 0 for finite x, else NaN
      return static_cast<int>(mean[j] - mean[j] == 0.0) & static_cast<int>(var[j] - var[j] == 0.0);
    };
    int64_t skips = 0;
    for (int64_t j = 0; j < count; ++j) skips += 1 - finite(j);
    // running = (1 - momentum) * running + momentum * batch * factor (factor 1 is exact).
    auto update = [&](P* running, const double* batch, double factor) BNC_INLINE {
      if (!running) return;
      for (int64_t j = 0; j < count; ++j) {
        const P old = running[c0 + j];
        const P updated = static_cast<P>((1.0 - momentum) * static_cast<double>(old) +
                                         momentum * batch[j] * factor);
        running[c0 + j] = finite(j) ? updated : old;
      }
    };
    update(running_mean, mean, 1.0);
    update(running_var, var, unbias);
    if (skips) __atomic_fetch_add(&skipped, skips, __ATOMIC_RELAXED);
    return true;
  };
  run_schedule(p, terms, ChoosePivots<T>{x, g}, finalize, map, st, threads);
  return skipped;
}

template <class T, class P>
int64_t forward_train(const T* x, T* y, ForwardEpilogue<T> epilogue, Geometry g, const P* weight,
                      const P* bias, double eps, double momentum, P* running_mean,
                      P* running_var, P* save_mean, P* save_invstd, int num_threads) {
  return with_forward_map<NormalizeMap>(x, y, epilogue, [&](const auto& map) {
    return forward_train_with(map, x, g, weight, bias, eps, momentum, running_mean, running_var,
                              save_mean, save_invstd, num_threads);
  });
}

// Statistics alone: the training forward's reduce and moments, nothing applied. m2 = n * var.
template <class T>
int64_t stats(const T* x, Geometry g, double* mean, double* m2, int num_threads) {
  constexpr int K = NoMap::kCoefs;
  const Plan p = make_plan(g, sizeof(T));
  const int threads = threads_for(p, sizeof(T), num_threads);
  ApplyState<T, K> st;
  if (!st.allocate(p, threads)) return -1;
  const MomentTerms<T> terms{x};
  const MomentsFinalize<T> moments{p, terms};
  const double n = static_cast<double>(g.per_channel());
  auto finalize = [&](const ChannelRange<T, K>& r, bool last) {
    if (!moments(r, r.temps[0], r.temps[1], r.temps[2], last)) return false;
    for (int64_t j = 0; j < r.c1 - r.c0; ++j) {
      mean[r.c0 + j] = r.temps[0][j];
      m2[r.c0 + j] = n * r.temps[1][j];
    }
    return true;
  };
  run_schedule(p, terms, ChoosePivots<T>{x, g}, finalize, NoMap{}, st, threads);
  return 0;
}

template <class T, class P>
int64_t forward_eval(const T* x, T* y, ForwardEpilogue<T> epilogue, Geometry g, const P* weight,
                     const P* bias, const P* running_mean, const P* running_var, double eps,
                     P* save_mean, P* save_invstd, int num_threads) {
  using C = Compute<T>;
  // No early exit and an integer OR: the loop vectorizes (square roots and divisions were most of
  // an eval call on many channels of few rows).
  int not_affine = 0;
  for (int64_t c = 0; c < g.channels; ++c) {
    const double m = static_cast<double>(running_mean[c]);
    const double invstd = 1.0 / __builtin_sqrt(static_cast<double>(running_var[c]) + eps);
    save_mean[c] = running_mean[c];
    save_invstd[c] = static_cast<P>(invstd);
    not_affine |= !(__builtin_fabs(m) * invstd <= kAffineMaxMeanOverStd);  // true for NaN
  }
  if (!not_affine) {
    return with_forward_map<AffineMap>(x, y, epilogue, [&](const auto& map) {
      return apply_everywhere<T>(g, map, [&](int64_t c, C* const* k, int64_t j) {
        const double scale = bn_scale(static_cast<double>(save_invstd[c]), weight, c);
        k[0][j] = static_cast<C>(scale);
        k[1][j] = static_cast<C>(bn_shift(bias, c) - static_cast<double>(running_mean[c]) * scale);
      }, num_threads);
    });
  }
  return with_forward_map<NormalizeMap>(x, y, epilogue, [&](const auto& map) {
    return apply_everywhere<T>(g, map, [&](int64_t c, C* const* k, int64_t j) {
      set_batch_norm(k, j, static_cast<double>(running_mean[c]),
                     static_cast<double>(save_invstd[c]), weight, bias, c);
    }, num_threads);
  });
}

// Apply with given statistics: y = (x - mean) * invstd * weight + bias, the training forward's map
// and coefficients.
template <class T, class P>
int64_t elemt(const T* x, T* y, Geometry g, const double* mean, const double* invstd,
              const P* weight, const P* bias, int num_threads) {
  using C = Compute<T>;
  return apply_everywhere<T>(g, NormalizeMap<T>{x, y}, [&](int64_t c, C* const* k, int64_t j) {
    set_batch_norm(k, j, mean[c], invstd[c], weight, bias, c);
  }, num_threads);
}

// Backward sums alone: sum_dy and sum_dy_xmu = sum(dy * (x - mean)), nothing applied.
template <class T>
int64_t backward_reduce(const T* dy, const T* x, Geometry g, const double* mean, double* sum_dy,
                        double* sum_dy_xmu, int num_threads) {
  constexpr int K = NoMap::kCoefs;
  const Plan p = make_plan(g, sizeof(T));
  const int threads = threads_for(p, sizeof(T), num_threads);
  ApplyState<T, K> st;
  if (!st.allocate(p, threads)) return -1;
  auto finalize = [&](const ChannelRange<T, K>& r, bool /*last*/) {
    for (int64_t j = 0; j < r.c1 - r.c0; ++j) {
      const int64_t c = r.c0 + j;
      sum_dy[c] = r.sums_a[j];
      // The sums are of dy * (x - shift), the shift the mean rounded to the compute type:
      // sum(dy * (x - mean)) = sum(dy * (x - shift)) + (shift - mean) * sum(dy).
      sum_dy_xmu[c] = r.shifts[j] == mean[c]
                          ? r.sums_b[j]
                          : r.sums_b[j] + (r.shifts[j] - mean[c]) * r.sums_a[j];
    }
    return true;
  };
  run_schedule(p, GradTerms<T>{dy, x}, MeanShifts<T, double>{mean}, finalize, NoMap{}, st,
               threads);
  return 0;
}

template <class T, class P, class Map, bool Relu, bool Bits>
int64_t backward_with(const Map& map, const MaskedDy<T, Relu, Bits>& mask, const T* dy, const T* x,
                      const Plan& p, const P* save_mean, const P* save_invstd, const P* weight,
                      P* grad_weight, P* grad_bias, int num_threads) {
  using C = Compute<T>;
  constexpr int K = Map::kCoefs;
  const Geometry& g = p.g;
  const int threads = threads_for(p, sizeof(T), num_threads);
  ApplyState<T, K> st;
  if (!st.allocate(p, threads)) return -1;
  const double n = static_cast<double>(g.per_channel());
  auto finalize = [&](const ChannelRange<T, K>& r, bool /*last*/) {
    const int64_t c0 = r.c0, count = r.c1 - r.c0;
    for (int64_t j = 0; j < count; ++j) {
      grad_bias[c0 + j] = static_cast<P>(r.sums_a[j]);
      grad_weight[c0 + j] = static_cast<P>(r.sums_b[j] * static_cast<double>(save_invstd[c0 + j]));
    }
    // Loops of their own per weight or none, with no branch inside: they vectorize.
    with_param(weight, c0, 1.0, [&](auto weight_of) {
      for (int64_t j = 0; j < count; ++j) {
        const double invstd = static_cast<double>(save_invstd[c0 + j]);
        if constexpr (Map::kCoefs > 1)  // training (the eval map has one coefficient)
          set_grad_coefs<Map>(r.coefs, j, r.shifts[j], invstd, weight_of(j), r.sums_a[j],
                              r.sums_b[j], n);
        else
          r.coefs[0][j] = static_cast<C>(invstd * weight_of(j));
      }
    });
    return true;  // the shift is the saved mean: no outlier pivot to move away from
  };
  // The shifts are exact: the saved mean is a P <= C number.
  run_schedule(p, GradTerms<T, Relu, Bits>{dy, x, mask}, MeanShifts<T, P>{save_mean}, finalize, map,
               st, threads);
  return 0;
}

template <class T, class P, bool Relu, bool Bits>
int64_t backward_masked(const T* dy, const T* x, T* dx, MaskedDy<T, Relu, Bits> mask, const Plan& p,
                        const P* save_mean, const P* save_invstd, const P* weight, bool training,
                        P* grad_weight, P* grad_bias, int num_threads) {
  if (training && grad_train_in_range<Compute<T>>(save_invstd, weight, p.g.channels))
    return backward_with(GradTrainMap<T, Relu, Bits>{{dy, x, dx, mask}}, mask, dy, x, p,
                         save_mean, save_invstd, weight, grad_weight, grad_bias, num_threads);
  if (training)
    return backward_with(GradTrainWideMap<T, Relu, Bits>{{dy, x, dx, mask}}, mask, dy, x, p,
                         save_mean, save_invstd, weight, grad_weight, grad_bias, num_threads);
  return backward_with(GradEvalMap<T, Relu, Bits>{dy, dx, mask}, mask, dy, x, p, save_mean,
                       save_invstd, weight, grad_weight, grad_bias, num_threads);
}

// Bytes of the ReLU backward's bits (one per element) for a plan's tensor, or 0 where they
// do not pay or cannot be written safely. They pay where the inputs come from memory (tensors as
// large as the streaming threshold): one input stream less in the apply. From cache, reading y
// costs less than unpacking the bits (relu backward (256, 1024): +40%). Only the row family's
// unfused plans (the segment family's reduce is other code), only float compute types (the
// caller's constexpr check: they write the bits in their first, float, reduce), and only where
// each row piece starts on a 64-element boundary, so that no two tasks share a byte of bits.
// At most kMaxReluBitsBytes: larger tensors read y again (the workspace stays bounded).
template <class T>
int64_t backward_relu_bits(const Plan& p) {
  const Geometry& g = p.g;
  const int64_t row = g.channels * g.inner;
  if (!p.row_family || p.fused || p.fold != 1 || row % 64 != 0 ||
      p.chunk_channels * g.inner % 64 != 0 || !streaming_output(g, sizeof(T)))
    return 0;
  const int64_t bytes = ceil_div(g.size(), 8);
  return bytes <= kMaxReluBitsBytes ? bytes : 0;
}

template <class T, class P>
int64_t backward(const T* dy, const T* x, T* dx, BackwardEpilogue<T> epilogue, Geometry g,
                 const P* save_mean, const P* save_invstd, const P* weight, bool training,
                 P* grad_weight, P* grad_bias, int num_threads) {
  const Plan p = make_plan(g, sizeof(T));
  if (epilogue.y) {
    if constexpr (sizeof(Compute<T>) == 4) {  // (not instantiated for double data)
      if (const int64_t bytes = backward_relu_bits<T>(p)) {
        void* const bits = std::malloc(static_cast<size_t>(bytes));
        if (bits == nullptr) return -1;
        const int64_t status = backward_masked(
            dy, x, dx,
            MaskedDy<T, true, true>{epilogue.y, epilogue.grad_residual,
                                    static_cast<uint8_t*>(bits)},
            p, save_mean, save_invstd, weight, training, grad_weight, grad_bias, num_threads);
        std::free(bits);
        return status;
      }
    }
    return backward_masked(dy, x, dx, MaskedDy<T, true>{epilogue.y, epilogue.grad_residual}, p,
                           save_mean, save_invstd, weight, training, grad_weight, grad_bias,
                           num_threads);
  }
  return backward_masked(dy, x, dx, MaskedDy<T, false>{nullptr, nullptr}, p, save_mean,
                         save_invstd, weight, training, grad_weight, grad_bias, num_threads);
}

// Backward apply with given sums (over every part of a batch of `count` elements per channel).
template <class Map, class T, class P>
int64_t backward_elemt_with(const Map& map, Geometry g, const double* mean, const double* invstd,
                            const P* weight, const double* sum_dy, const double* sum_dy_xmu,
                            double count, int num_threads) {
  using C = Compute<T>;
  return apply_everywhere<T>(g, map, [&](int64_t c, C* const* k, int64_t j) {
    set_grad_coefs<Map>(k, j, mean[c], invstd[c], weight ? static_cast<double>(weight[c]) : 1.0,
                        sum_dy[c], sum_dy_xmu[c], count);
  }, num_threads);
}

template <class T, class P>
int64_t backward_elemt(const T* dy, const T* x, T* dx, Geometry g, const double* mean,
                       const double* invstd, const P* weight, const double* sum_dy,
                       const double* sum_dy_xmu, double count, int num_threads) {
  // The same choice of map as the fused backward's, so that both give the same bits.
  if (grad_train_in_range<Compute<T>>(invstd, weight, g.channels))
    return backward_elemt_with<GradTrainMap<T>, T>(GradTrainMap<T>{{dy, x, dx, {}}}, g, mean, invstd,
                                                   weight, sum_dy, sum_dy_xmu, count,
                                                   num_threads);
  return backward_elemt_with<GradTrainWideMap<T>, T>(GradTrainWideMap<T>{{dy, x, dx, {}}}, g, mean,
                                                     invstd, weight, sum_dy, sum_dy_xmu, count,
                                                     num_threads);
}

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
