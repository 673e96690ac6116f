// Reduction terms: the two per-element quantities a reduce sums per channel, given the channel's
// shift (forward moments; backward sums of dy and dy * (x - mean)).
#pragma once

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

// Backward statistics: sums of dy and dy * (x - mean).
template <class T>
struct GradTerms {
  static constexpr bool kSquares = false;
  const T* dy;
  const T* x;
  void prefetch(int64_t off, int64_t count) const {
    prefetch_piece(dy + off, count);
    prefetch_piece(x + off, count);
  }
  void vec(int64_t off, vd mean, vd& a, vd& b) const {
    const vd g = load_vd(dy + off);
    a += g;
    b += g * (load_vd(x + off) - mean);
  }
  void one(int64_t off, double mean, double& a, double& b) const {
    const double g = static_cast<double>(widen(dy[off]));
    a += g;
    b += g * (static_cast<double>(widen(x[off])) - mean);
  }
  void vec_f(int64_t off, vf mean, vf& a, vf& b) const {
    const vf g = load_compute(dy + off);
    a += g;
    b += g * (load_compute(x + off) - mean);
  }
  void one_f(int64_t off, float mean, float& a, float& b) const {
    const float g = static_cast<float>(widen(dy[off]));
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
