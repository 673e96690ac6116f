// bnc kernel interface: plain C++17, no Python. Every kernel works on an (outer, channels, inner)
// geometry: element (o, c, i) of a C-contiguous array lives at ((o * channels) + c) * inner + i.
#pragma once

#include <cstdint>

namespace bnc {

struct Geometry {
  int64_t outer;
  int64_t channels;
  int64_t inner;
  int64_t per_channel() const { return outer * inner; }
  int64_t size() const { return outer * channels * inner; }
};

// Element type of float16 arrays (NumPy's float16 is IEEE binary16, like _Float16).
using half = _Float16;

// Element type of bfloat16 arrays (ml_dtypes' and PyTorch's): the upper 16 bits of a float32.
// Plain data: its conversions (round to nearest even) live in each ISA's namespace (simd.h), so
// that no function compiled for one instruction set is shared with another.
struct bfloat16 {
  unsigned short bits;
};

// The forward's fused epilogue: y = act(BN(x) + residual), with `residual` (null: none) an array
// of x's geometry and dtype, added in the compute type, and act the ReLU (max(v, 0), NaN kept)
// when `relu`: one pass over memory instead of three.
template <class T>
struct ForwardEpilogue {
  const T* residual;
  bool relu;
};

// The backward's: with `y` (the forward's output after its ReLU; null: no ReLU) dy is masked by
// y > 0 in the same pass, and, with `grad_residual`, the masked dy (the residual's gradient) is
// written there too.
template <class T>
struct BackwardEpilogue {
  const T* y;
  T* grad_residual;
};

// Forward in training mode (batch statistics). `weight`, `bias`, `running_mean` and `running_var`
// may be null. The running statistics of a channel are updated with the unbiased variance unless
// that channel's batch statistics are not finite; the number of such skipped channels is returned.
// Requires outer * inner >= 2.
// Every kernel returns a negative value when it cannot allocate its (small) workspace.
template <class T, class P>
using ForwardTrainFn = int64_t (*)(const T* x, T* y, ForwardEpilogue<T> epilogue, Geometry g,
                                   const P* weight, const P* bias, double eps, double momentum,
                                   P* running_mean, P* running_var, P* save_mean,
                                   P* save_invstd, int num_threads);

// Forward in inference mode: normalizes with the running statistics; writes
// save_mean = running_mean and save_invstd = 1 / sqrt(running_var + eps).
// Returns 0.
template <class T, class P>
using ForwardEvalFn = int64_t (*)(const T* x, T* y, ForwardEpilogue<T> epilogue, Geometry g,
                                  const P* weight, const P* bias, const P* running_mean,
                                  const P* running_var, double eps, P* save_mean,
                                  P* save_invstd, int num_threads);

// Backward: dx, grad_weight = sum(dy * (x - mean) * invstd), grad_bias = sum(dy).
// training=true differentiates through the batch statistics; false treats them as constants.
// Returns 0.
template <class T, class P>
using BackwardFn = int64_t (*)(const T* dy, const T* x, T* dx, BackwardEpilogue<T> epilogue,
                               Geometry g, const P* save_mean, const P* save_invstd,
                               const P* weight, bool training, P* grad_weight, P* grad_bias,
                               int num_threads);

// Split-phase building blocks (per-channel statistics and sums in double):
// statistics: mean and m2 = sum((x - mean)^2), from the training forward's pivoted sums.
// Requires outer * inner >= 1.
template <class T>
using StatsFn = int64_t (*)(const T* x, Geometry g, double* mean, double* m2, int num_threads);

// Apply with given statistics: y = (x - mean) * invstd * weight + bias.
template <class T, class P>
using ElemtFn = int64_t (*)(const T* x, T* y, Geometry g, const double* mean,
                            const double* invstd, const P* weight, const P* bias,
                            int num_threads);

// Backward sums: sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)).
template <class T>
using BackwardReduceFn = int64_t (*)(const T* dy, const T* x, Geometry g, const double* mean,
                                     double* sum_dy, double* sum_dy_xmu, int num_threads);

// Backward apply with given sums over `count` elements per channel (all parts of a batch):
// dx = weight * invstd * (dy - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count).
template <class T, class P>
using BackwardElemtFn = int64_t (*)(const T* dy, const T* x, T* dx, Geometry g,
                                    const double* mean, const double* invstd, const P* weight,
                                    const double* sum_dy, const double* sum_dy_xmu, double count,
                                    int num_threads);

template <class T, class P>
struct KernelSet {
  using Data = T;
  using Param = P;
  ForwardTrainFn<T, P> forward_train;
  ForwardEvalFn<T, P> forward_eval;
  BackwardFn<T, P> backward;
  StatsFn<T> stats;
  ElemtFn<T, P> elemt;
  BackwardReduceFn<T> backward_reduce;
  BackwardElemtFn<T, P> backward_elemt;
};

struct KernelTable {
  const char* isa;
  KernelSet<float, float> f32;
  KernelSet<double, double> f64;
  KernelSet<half, float> f16;
  KernelSet<bfloat16, float> bf16;
};

// Outputs of at least this many bytes are written with non-temporal stores (they bypass the cache:
// less memory traffic). Default: a quarter of the L3 cache (8 MiB when unknown): input and output
// together then fill over half of L3, and the output would not survive the next layer's traffic
// there anyway. Results do not depend on it. Defined in dispatch.cpp.
int64_t stream_threshold_bytes();
void set_stream_threshold_bytes(int64_t bytes);

// The L3 cache size this CPU's cores see (32 MiB when unknown). Defined in dispatch.cpp.
int64_t l3_bytes();

// Per-ISA tables, defined in isa_*.cpp.
const KernelTable& kernel_table_baseline();
const KernelTable& kernel_table_avx2();
const KernelTable& kernel_table_avx512();

}  // namespace bnc
