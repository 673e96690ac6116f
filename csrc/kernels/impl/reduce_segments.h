// The segment family's reduce (inner >= kSegmentMinInner): 16 lanes per channel along each
// contiguous segment; and reduce_task, one task of either family.
#pragma once

#include "kernels/impl/reduce_rows.h"

namespace bnc {
namespace BNC_ISA {
namespace {

// The segment family's reduce, in three steps so that a chunk's rows can be reduced a few at a
// time (apply_reducing_next): zero the 16 lanes of each of `channels` channels; add rows
// [o0, o1) of channels [c0, c1) to them (the next row prefetched if `prefetch`), channel c's
// shift at shifts[c - c0]; sum each channel's lanes to out_a/out_b.
inline void zero_segment_lanes(const Scratch& s, int64_t channels) {
  for (int64_t j = 0; j < channels * kLanes; ++j) s.acc_a[j] = s.acc_b[j] = 0.0;
}

// Elements [i0, i1) of each segment (i0 a multiple of kLanes, so element i still goes to lane
// i % 16); by default the whole segment.
template <class Terms>
void reduce_segment_rows(const Geometry& g, const Terms& terms, const double* shifts, int64_t c0,
                         int64_t c1, int64_t o0, int64_t o1, bool prefetch, const Scratch& s,
                         int64_t i0 = 0, int64_t i1 = -1) {
  if (i1 < 0) i1 = g.inner;
  const int64_t vec_end = i0 + (i1 - i0) / kLanes * kLanes;
  for (int64_t o = o0; o < o1; ++o) {
    if (prefetch && o + 1 < o1)
      terms.prefetch(((o + 1) * g.channels + c0) * g.inner + i0,
                     (c1 - c0 - 1) * g.inner + (i1 - i0));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t seg = (o * g.channels + c) * g.inner;
      const double shift = shifts[c - c0];
      const vd sh = broadcast<vd>(shift);
      double* lanes_a = s.acc_a + (c - c0) * kLanes;
      double* lanes_b = s.acc_b + (c - c0) * kLanes;
      vd a[kVecsPerLanes], b[kVecsPerLanes];
      for (int64_t k = 0; k < kVecsPerLanes; ++k) {
        a[k] = load<vd>(lanes_a + k * kDoublesPerVec);
        b[k] = load<vd>(lanes_b + k * kDoublesPerVec);
      }
      for (int64_t i = i0; i < vec_end; i += kLanes)
        for (int64_t k = 0; k < kVecsPerLanes; ++k)
          terms.vec(seg + i + k * kDoublesPerVec, sh, a[k], b[k]);
      for (int64_t k = 0; k < kVecsPerLanes; ++k) {
        store(lanes_a + k * kDoublesPerVec, a[k]);
        store(lanes_b + k * kDoublesPerVec, b[k]);
      }
      for (int64_t i = vec_end; i < i1; ++i)
        terms.one(seg + i, shift, lanes_a[i - vec_end], lanes_b[i - vec_end]);
    }
  }
}

inline void segment_sums(const Scratch& s, int64_t channels, double* out_a, double* out_b) {
  for (int64_t c = 0; c < channels; ++c) {
    out_a[c] = lane_sum(s.acc_a + c * kLanes);
    out_b[c] = lane_sum(s.acc_b + c * kLanes);
  }
}

// Reduces task (chunk, row_block), the chunk's channel c shifted by shifts[c - c0]: writes the
// chunk's per-channel sums to out_a/out_b.
template <class Terms>
void reduce_task(const Plan& p, const Terms& terms, const double* shifts, int64_t chunk,
                 int64_t row_block, const Scratch& s, double* out_a, double* out_b) {
  using T = TermsElem<Terms>;
  const Geometry& g = p.g;
  const auto [c0, c1, o0, o1, i0, i1] = TaskBounds(p, chunk, row_block);
  const int64_t row_stride = g.channels * g.inner;

  if (p.row_family) {
    // Lane j of the piece is element (c0 + j / inner, j % inner) of every row: one accumulator
    // per lane, rows added in order. With one element per channel in a row, the lanes are the
    // channels: the sums go straight to out. Narrow rows are folded (Plan::fold): `fold`
    // consecutive rows are one super-row of `lanes` lanes, lane j holding element j % width of
    // its rows; a task's rows end with a partial super-row (`tail_width` lanes) when they are
    // not a multiple of `fold`.
    const int64_t width = (c1 - c0) * g.inner;
    const int64_t fold = p.fold;
    const int64_t lanes = width * fold;
    const bool direct = g.inner == 1 && fold == 1;
    double* acc_a = direct ? out_a : s.acc_a;
    double* acc_b = direct ? out_b : s.acc_b;
    const double* lane_shift = shifts;
    if (!direct) {
      for (int64_t j = 0; j < lanes; ++j) s.shift[j] = shifts[j % width / g.inner];
      lane_shift = s.shift;
    }
    for (int64_t j = 0; j < lanes; ++j) acc_a[j] = acc_b[j] = 0.0;
    RowPiece piece{c0 * g.inner, row_stride, lanes, g.size(), lane_shift, acc_a, acc_b};
    int64_t r0 = o0, r1 = o1, tail_width = 0;  // the piece's rows, the partial super-row
    if (fold > 1) {  // whole rows (one chunk), so a super-row is contiguous
      piece.base = o0 * row_stride;
      piece.row_stride = lanes;
      r0 = 0;
      r1 = (o1 - o0) / fold;
      tail_width = (o1 - o0) % fold * width;
    }
    if constexpr (kFloatPartials<Terms>)  // the lanes' shifts in float, for either read order
      for (int64_t j = 0; j < lanes; ++j) s.part_shift[j] = static_cast<float>(lane_shift[j]);
    // In order also from cache for terms of several inputs (the backward's dy, x and y) in rows
    // of 2 to 4 KiB: the blocked order's kPartialRows rows of each are that many streams at once,
    // in one L1 set at 4 KiB. Narrower rows keep their sums in registers (docs/tuning.md).
    const int64_t row_bytes = lanes * static_cast<int64_t>(sizeof(T));
    const bool in_order =
        p.num_chunks == 1 &&
        ((row_bytes <= kInOrderMaxRowBytes && streaming_output(g, sizeof(T))) ||
         (Terms::kInputs > 1 && row_bytes > kInOrderMaxRowBytes &&
          row_bytes <= kInOrderManyInputsMaxRowBytes));
    auto read = [&](const RowPiece& q, int64_t q0, int64_t q1) {
      if (!in_order) {
        reduce_rows_blocked(terms, q, q0, q1, s, p.num_chunks > 1);
      } else if constexpr (kFloatPartials<Terms>) {
        reduce_rows_in_order_f(terms, q, q0, q1, s);
      } else {
        reduce_rows_in_order_d(terms, q, q0, q1);
      }
    };
    read(piece, r0, r1);
    if (tail_width > 0) {
      RowPiece tail = piece;
      tail.base += r1 * lanes;
      tail.width = tail_width;
      read(tail, 0, 1);
    }
    if constexpr (kFloatPartials<Terms>) {
      // A lane whose float partial sums overflowed (|terms| > 4e37) or hold a NaN or an infinity,
      // or (sums of squares) whose mean square lies below kTinySquares, where float squares
      // underflow, takes sums of the task's rows redone in double, vectorized, while they are in
      // cache; the other lanes keep theirs, so no lane's result depends on another's.
      auto redo = [&](int64_t j) {
        if (!is_finite(acc_a[j]) || !is_finite(acc_b[j])) return true;
        const int64_t rows = r1 - r0 + (j < tail_width ? 1 : 0);
        return Terms::kSquares && acc_b[j] < kTinySquares * static_cast<double>(rows) &&
               !(acc_a[j] == 0.0 && acc_b[j] == 0.0);
      };
      bool any = !lanes_finite(piece);
      if constexpr (Terms::kSquares)
        for (int64_t j = 0; j < lanes && !any; ++j) any = redo(j);
      if (any) {
        RowPiece again = piece;
        again.acc_a = s.redo_a;
        again.acc_b = s.redo_b;
        for (int64_t j = 0; j < lanes; ++j) s.redo_a[j] = s.redo_b[j] = 0.0;
        reduce_rows_blocked<true>(terms, again, r0, r1, s, false);
        if (tail_width > 0) {
          RowPiece tail = again;
          tail.base += r1 * lanes;
          tail.width = tail_width;
          reduce_rows_blocked<true>(terms, tail, 0, 1, s, false);
        }
        for (int64_t j = 0; j < lanes; ++j) {
          if (!redo(j)) continue;
          acc_a[j] = s.redo_a[j];
          acc_b[j] = s.redo_b[j];
        }
      }
    }
    if (direct) return;
    for (int64_t c = c0; c < c1; ++c) {
      double sum_a = 0.0, sum_b = 0.0;
      for (int64_t k = 0; k < fold; ++k) {
        const int64_t first = k * width + (c - c0) * g.inner;
        for (int64_t i = 0; i < g.inner; ++i) {
          sum_a += acc_a[first + i];
          sum_b += acc_b[first + i];
        }
      }
      out_a[c - c0] = sum_a;
      out_b[c - c0] = sum_b;
    }
    return;
  }

  // Segment family: 16 lanes per channel (element i of a segment goes to lane i % 16), segments
  // visited in memory order; each channel's lanes live in acc_a/acc_b between its segments.
  zero_segment_lanes(s, c1 - c0);
  reduce_segment_rows(g, terms, shifts, c0, c1, o0, o1, true, s, i0, i1);
  segment_sums(s, c1 - c0, out_a, out_b);
}

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
