// Reduction terms: the two per-element quantities a reduce sums per channel, given the channel's
// shift (forward moments; backward sums of dy and dy * (x - mean)).
#pragma once

#include "kernels/impl/bits.h"
#include "kernels/impl/simd.h"

namespace bnc {
namespace BNC_ISA {
namespace {

// ---------------------------------------------------------------------------------------------
// Reduction terms: the two per-element quantities summed per channel, given the channel's shift.
// vec/one work in double (float64 data, and the segment family); vec_f/one_f in float, for the
// row family's float partial sums of float32 and float16 data (see kFloatPartials).

// Forward statistics: d = x - pivot; sums of d and d*d.
template <class T>
struct MomentTerms {
  static constexpr bool kSquares = true;  // b sums squares (see reduce_task)
  static constexpr int kInputs = 1;  // tensors read (reduce_task's read order)
  const T* x;
  void prefetch(int64_t off, int64_t count) const { prefetch_piece(x + off, count); }
  void vec(int64_t off, vd shift, vd& a, vd& b) const {
    const vd d = load_vd(x + off) - shift;
    a += d;
    b += d * d;
  }
  void one(int64_t off, double shift, double& a, double& b) const {
    const double d = static_cast<double>(widen(x[off])) - shift;
    a += d;
    b += d * d;
  }
  void vec_f(int64_t off, vf shift, vf& a, vf& b) const {
    const vf d = load_compute(x + off) - shift;
    a += d;
    b += d * d;
  }
  void one_f(int64_t off, float shift, float& a, float& b) const {
    const float d = static_cast<float>(widen(x[off])) - shift;
    a += d;
    b += d * d;
  }
};

// dy, masked by y > 0 when the forward ended in a ReLU (BackwardEpilogue; a NaN y masks), and
// written to grad_residual when asked (exact: the masked dy is dy or 0). With Bits the reduce
// (the sum_ and _d functions) also writes y > 0 as bits, one per element at its offset, and the
// apply (vec, one) reads those instead of y: a third input stream less on the second sweep
// (backward_relu_bits says where). The bits are the selects' own conditions: the same results.
template <class T, bool Relu, bool Bits = false>
struct MaskedDy {
  const T* y;
  T* grad_residual;
  uint8_t* bits = nullptr;
  Vec<T> vec(const T* dy, int64_t off) const {
    Vec<T> g = load_compute(dy + off);
    if constexpr (Relu) {
      g = applied_mask(off) ? in_register(g) : Vec<T>{};
      if (grad_residual) store_compute(grad_residual + off, g);
    }
    return g;
  }
  Compute<T> one(const T* dy, int64_t off) const {
    Compute<T> g = widen(dy[off]);
    if constexpr (Relu) {
      const bool positive = Bits ? load_bits(bits, off, 1) != 0 : widen(y[off]) > Compute<T>(0);
      g = positive ? g : Compute<T>(0);
      if (grad_residual) grad_residual[off] = narrow<T>(g);
    }
    return g;
  }
  // For the sums (nothing stored but the bits): in the compute type, and in double (exact
  // widenings).
  Vec<T> sum_vec(const T* dy, int64_t off) const {
    const Vec<T> g = load_compute(dy + off);
    if constexpr (Relu) {
      const Vec<T> v = load_compute(y + off);
      if constexpr (Bits) store_bits(bits, off, positive_bits(v), static_cast<int>(kVecElems<T>));
      return v > Compute<T>(0) ? in_register(g) : Vec<T>{};
    }
    return g;
  }
  Compute<T> sum_one(const T* dy, int64_t off) const {
    const Compute<T> g = widen(dy[off]);
    if constexpr (Relu) return sum_positive(off) ? g : Compute<T>(0);
    return g;
  }
  vd vec_d(const T* dy, int64_t off) const {
    vd g = load_vd(dy + off);
    if constexpr (Relu) {
      const vd v = load_vd(y + off);
      if constexpr (Bits) store_bits(bits, off, positive_bits(v), static_cast<int>(kDoublesPerVec));
      g = v > 0.0 ? in_register(g) : vd{};
    }
    return g;
  }
  double one_d(const T* dy, int64_t off) const {
    const double g = static_cast<double>(widen(dy[off]));
    if constexpr (Relu) return sum_positive(off) ? g : 0.0;
    return g;
  }
  // What the reduce reads besides dy and x, and what the apply reads (nothing more with Bits).
  void prefetch_sums(int64_t off, int64_t count) const {
    if constexpr (Relu) prefetch_piece(y + off, count);
  }
  void prefetch(int64_t off, int64_t count) const {
    if constexpr (Relu && !Bits) prefetch_piece(y + off, count);
  }
  // Inputs the apply reads besides dy (and x).
  static constexpr int kApplyInputs = Relu && !Bits ? 1 : 0;

 private:
  // The apply's mask of a vector: the bits, or y > 0.
  auto applied_mask(int64_t off) const {
    if constexpr (Bits)
      return lanes_of<Vec<T>>(load_bits(bits, off, static_cast<int>(kVecElems<T>)));
    else
      return load_compute(y + off) > Compute<T>(0);
  }
  // A reduce's y > 0 for one element, also written to the bits.
  bool sum_positive(int64_t off) const {
    const bool positive = widen(y[off]) > Compute<T>(0);
    if constexpr (Bits) store_bits(bits, off, positive, 1);
    return positive;
  }
};

// Backward statistics: sums of dy and dy * (x - mean) (dy masked by the ReLU when Relu).
template <class T, bool Relu = false, bool Bits = false>
struct GradTerms {
  static constexpr bool kSquares = false;
  static constexpr int kInputs = Relu ? 3 : 2;
  const T* dy;
  const T* x;
  MaskedDy<T, Relu, Bits> mask{};
  void prefetch(int64_t off, int64_t count) const {
    prefetch_piece(dy + off, count);
    prefetch_piece(x + off, count);
    mask.prefetch_sums(off, count);
  }
  void vec(int64_t off, vd mean, vd& a, vd& b) const {
    const vd g = mask.vec_d(dy, off);
    a += g;
    b += g * (load_vd(x + off) - mean);
  }
  void one(int64_t off, double mean, double& a, double& b) const {
    const double g = mask.one_d(dy, off);
    a += g;
    b += g * (static_cast<double>(widen(x[off])) - mean);
  }
  void vec_f(int64_t off, vf mean, vf& a, vf& b) const {
    const vf g = mask.sum_vec(dy, off);
    a += g;
    b += g * (load_compute(x + off) - mean);
  }
  void one_f(int64_t off, float mean, float& a, float& b) const {
    const float g = static_cast<float>(mask.sum_one(dy, off));
    a += g;
    b += g * (static_cast<float>(widen(x[off])) - mean);
  }
};

// Element type of a Terms (the type its pointer x points to).
template <class P>
struct PointeeOf;
template <class T>
struct PointeeOf<const T*> {
  using type = T;
};
template <class Terms>
using TermsElem = typename PointeeOf<decltype(Terms::x)>::type;

// Float data's terms are summed in float over a few rows first (reduce_rows.h): widening every
// element to double costs twice the arithmetic. Shifts are exact in float.
template <class Terms>
constexpr bool kFloatPartials = sizeof(Compute<TermsElem<Terms>>) == 4;

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
