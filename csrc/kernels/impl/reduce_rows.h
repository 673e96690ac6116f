// The row family's reduce (inner < kSegmentMinInner): vectorized across the elements of a row
// piece, one accumulator per lane, rows in order or blocked.
#pragma once

#include "kernels/impl/terms.h"
#include "kernels/impl/workspace.h"

namespace bnc {
namespace BNC_ISA {
namespace {

// One chunk's piece of every row, as the row family's reduce sees it: lane j is element
// base + j of each row; acc_a/acc_b hold one double accumulator per lane.
struct RowPiece {
  int64_t base, row_stride, width;
  int64_t end;  // elements in the tensor (prefetches stay below)
  const double* lane_shift;
  double* acc_a;
  double* acc_b;
};

// Rows are read in one of two orders (the sums are the same bits either way):
//  - in order: each row front to back, then the next: one sequential stream for the memory
//    system; the per-lane sums live in L1 scratch, so rows must be short;
//  - blocked: kPartialRows rows side by side, a cache line of each at a time, sums in
//    registers: fewer loads and stores per element, better from cache and for long rows.
// Float data (float32, float16) is summed in float over blocks of kPartialRows rows (counted from
// the task's first row), then added to double accumulators (see docs/numerics.md); a lane whose
// float sums are not finite is summed again in double (reduce_task).

// Adds the float sums of lanes [j, j + W) to their double accumulators.
inline void flush_lanes(const RowPiece& q, int64_t j, vf a, vf b) {
  constexpr int64_t W = sizeof(vf) / sizeof(float);
  float fa[W], fb[W];
  store(fa, a);
  store(fb, b);
  for (int64_t h = 0; h < W; h += kDoublesPerVec) {
    store(q.acc_a + j + h, load<vd>(q.acc_a + j + h) + load_vd(fa + h));
    store(q.acc_b + j + h, load<vd>(q.acc_b + j + h) + load_vd(fb + h));
  }
}

// True if every lane's two accumulators are finite (x - x is 0 for finite x, NaN otherwise).
inline bool lanes_finite(const RowPiece& q) {
  const int64_t vec_width = q.width - q.width % kDoublesPerVec;
  vd v = {};
  for (int64_t j = 0; j < vec_width; j += kDoublesPerVec) {
    const vd a = load<vd>(q.acc_a + j), b = load<vd>(q.acc_b + j);
    v += (a - a) + (b - b);
  }
  double t = 0.0;
  for (int64_t l = 0; l < kDoublesPerVec; ++l) t += v[l];
  for (int64_t j = vec_width; j < q.width; ++j)
    t += (q.acc_a[j] - q.acc_a[j]) + (q.acc_b[j] - q.acc_b[j]);
  return t == 0.0;
}

// Rows [o0, o1) in order, float partial sums in scratch.
template <class Terms>
void reduce_rows_in_order_f(const Terms& terms, const RowPiece& q, int64_t o0, int64_t o1,
                            const Scratch& s) {
  using T = TermsElem<Terms>;
  constexpr int64_t W = kVecElems<T>;
  const int64_t vec_width = q.width - q.width % W;
  const int64_t ahead = kInOrderPrefetchBytes / static_cast<int64_t>(sizeof(T));
  float* const pa = s.part_a;
  float* const pb = s.part_b;
  const float* const shift = s.part_shift;
  for (int64_t b0 = o0; b0 < o1; b0 += kPartialRows) {
    const int64_t b1 = min64(o1, b0 + kPartialRows);
    for (int64_t j = 0; j < q.width; ++j) pa[j] = pb[j] = 0.0f;
    for (int64_t o = b0; o < b1; ++o) {
      const int64_t r = o * q.row_stride + q.base;
      if (r + ahead + q.width <= q.end) terms.prefetch(r + ahead, q.width);
      for (int64_t j = 0; j < vec_width; j += W) {
        vf a = load<vf>(pa + j), b = load<vf>(pb + j);
        terms.vec_f(r + j, load<vf>(shift + j), a, b);
        store(pa + j, a);
        store(pb + j, b);
      }
      for (int64_t j = vec_width; j < q.width; ++j) terms.one_f(r + j, shift[j], pa[j], pb[j]);
    }
    for (int64_t j = 0; j < vec_width; j += W) flush_lanes(q, j, load<vf>(pa + j), load<vf>(pb + j));
    for (int64_t j = vec_width; j < q.width; ++j) {
      q.acc_a[j] += static_cast<double>(pa[j]);
      q.acc_b[j] += static_cast<double>(pb[j]);
    }
  }
}

// Rows [o0, o1) in order, in double.
template <class Terms>
void reduce_rows_in_order_d(const Terms& terms, const RowPiece& q, int64_t o0, int64_t o1) {
  using T = TermsElem<Terms>;
  const int64_t vec_width = q.width - q.width % kDoublesPerVec;
  const int64_t ahead = kInOrderPrefetchBytes / static_cast<int64_t>(sizeof(T));
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t r = o * q.row_stride + q.base;
    if (r + ahead + q.width <= q.end) terms.prefetch(r + ahead, q.width);
    for (int64_t j = 0; j < vec_width; j += kDoublesPerVec) {
      vd a = load<vd>(q.acc_a + j), b = load<vd>(q.acc_b + j);
      terms.vec(r + j, load<vd>(q.lane_shift + j), a, b);
      store(q.acc_a + j, a);
      store(q.acc_b + j, b);
    }
    for (int64_t j = vec_width; j < q.width; ++j)
      terms.one(r + j, q.lane_shift[j], q.acc_a[j], q.acc_b[j]);
  }
}

// Vectors per visit of a row in the blocked order, for vectors that cover `bytes` of a row: a
// cache line's worth (at most 4, for the registers). With power-of-two row sizes all rows of a
// block fall in the same L1 set, and a line left half-read is often evicted before its second
// half is needed.
constexpr int64_t line_vecs(int64_t bytes) {
  return 64 / bytes > 4 ? 4 : (64 / bytes < 1 ? 1 : 64 / bytes);
}

// Blocked order, float partial sums: lanes [j, j + U * W) of `rows` rows from r, added to the
// lanes' double accumulators.
template <int64_t U, class Terms>
inline void add_block_f(const Terms& terms, const RowPiece& q, int64_t r, int64_t j, int64_t rows,
                        const float* shift) {
  constexpr int64_t W = kVecElems<TermsElem<Terms>>;
  vf sh[U], sa[U], sb[U];
  for (int64_t u = 0; u < U; ++u) {
    sh[u] = load<vf>(shift + j + u * W);
    sa[u] = vf{};
    sb[u] = vf{};
  }
  auto add_row = [&](int64_t k) {
    for (int64_t u = 0; u < U; ++u)
      terms.vec_f(r + k * q.row_stride + j + u * W, sh[u], sa[u], sb[u]);
  };
  // A full block has a constant trip count, so the compiler unrolls it.
  if (rows == kPartialRows) {
    for (int64_t k = 0; k < kPartialRows; ++k) add_row(k);
  } else {
    for (int64_t k = 0; k < rows; ++k) add_row(k);
  }
  for (int64_t u = 0; u < U; ++u) flush_lanes(q, j + u * W, sa[u], sb[u]);
}

// Blocked order, in double: lanes [j, j + U * kDoublesPerVec) of `rows` rows from r.
template <int64_t U, class Terms>
inline void add_block_d(const Terms& terms, const RowPiece& q, int64_t r, int64_t j, int64_t rows) {
  vd sh[U], a[U], b[U];
  for (int64_t u = 0; u < U; ++u) {
    sh[u] = load<vd>(q.lane_shift + j + u * kDoublesPerVec);
    a[u] = load<vd>(q.acc_a + j + u * kDoublesPerVec);
    b[u] = load<vd>(q.acc_b + j + u * kDoublesPerVec);
  }
  auto add_row = [&](int64_t k) {
    for (int64_t u = 0; u < U; ++u)
      terms.vec(r + k * q.row_stride + j + u * kDoublesPerVec, sh[u], a[u], b[u]);
  };
  if (rows == kPartialRows) {
    for (int64_t k = 0; k < kPartialRows; ++k) add_row(k);
  } else {
    for (int64_t k = 0; k < rows; ++k) add_row(k);
  }
  for (int64_t u = 0; u < U; ++u) {
    store(q.acc_a + j + u * kDoublesPerVec, a[u]);
    store(q.acc_b + j + u * kDoublesPerVec, b[u]);
  }
}

// Rows [o0, o1) in the blocked order.
// kInDouble: float data summed in double too (no float partial sums), for reduce_task's re-sums.
template <bool kInDouble = false, class Terms>
void reduce_rows_blocked(const Terms& terms, const RowPiece& q, int64_t o0, int64_t o1,
                         const Scratch& s, bool prefetch) {
  using T = TermsElem<Terms>;
  constexpr bool kFloat = kFloatPartials<Terms> && !kInDouble;
  constexpr int64_t W = kFloat ? kVecElems<T> : kDoublesPerVec;
  constexpr int64_t U = line_vecs(W * static_cast<int64_t>(sizeof(T)));
  const int64_t vec_width = q.width - q.width % W;
  const float* const shift = s.part_shift;
  const int64_t piece_bytes = q.width * static_cast<int64_t>(sizeof(T));
  const int64_t ahead =
      kPartialRows * max64(1, ceil_div(kPrefetchAheadBytes, max64(1, kPartialRows * piece_bytes)));
  for (int64_t b0 = o0; b0 < o1; b0 += kPartialRows) {
    const int64_t rows = min64(o1 - b0, kPartialRows);
    const int64_t r = b0 * q.row_stride + q.base;
    if (prefetch)
      for (int64_t k = ahead; k < ahead + kPartialRows && b0 + k < o1; ++k)
        terms.prefetch(r + k * q.row_stride, q.width);
    int64_t j = 0;
    if constexpr (kFloat) {
      for (; j + U * W <= vec_width; j += U * W) add_block_f<U>(terms, q, r, j, rows, shift);
      for (; j < vec_width; j += W) add_block_f<1>(terms, q, r, j, rows, shift);
      for (; j < q.width; ++j) {
        float a = 0.0f, b = 0.0f;
        for (int64_t k = 0; k < rows; ++k) terms.one_f(r + k * q.row_stride + j, shift[j], a, b);
        q.acc_a[j] += static_cast<double>(a);
        q.acc_b[j] += static_cast<double>(b);
      }
    } else {
      for (; j + U * W <= vec_width; j += U * W) add_block_d<U>(terms, q, r, j, rows);
      for (; j < vec_width; j += W) add_block_d<1>(terms, q, r, j, rows);
      for (; j < q.width; ++j)
        for (int64_t k = 0; k < rows; ++k)
          terms.one(r + k * q.row_stride + j, q.lane_shift[j], q.acc_a[j], q.acc_b[j]);
    }
  }
}


}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
