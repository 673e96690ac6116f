// Apply loops: a map over a range of elements in memory order (aligned vectors, streaming
// stores, prefetch), over one task of the plan, or over the whole tensor.
#pragma once

#include "kernels/impl/reduce_segments.h"
#include "kernels/impl/team.h"

namespace bnc {
namespace BNC_ISA {
namespace {

// Inputs that come from memory are prefetched kApplyPrefetchBytes ahead of the vector being
// written: hardware prefetch alone keeps too few lines in flight for a loop that computes between
// its loads and stores. Inputs still in cache only pay for the prefetches, so the schedules ask
// for them only where the inputs cannot be in cache.

// What the apply loop prefetches while it writes element e: the inputs at e + ahead, for e below
// `end` (none when end is 0).
struct ApplyPrefetch {
  int64_t ahead = 0;
  int64_t end = 0;
  // Its own range [begin, end), kApplyPrefetchBytes ahead (prefetches stay inside the range).
  template <class T>
  static ApplyPrefetch within(int64_t end) {
    const int64_t ahead = kApplyPrefetchBytes / static_cast<int64_t>(sizeof(T));
    return ApplyPrefetch{ahead, end - ahead};
  }
};

// Applies `map` to elements [e, end) of the flattened tensor, in memory order, prefetching as
// `prefetch` says.
template <bool Stream, class T, class Map>
void apply_range(const Geometry& geometry, const Map& map, const Coefs<T, Map::kCoefs>& cf,
                 int64_t e, int64_t end, ApplyPrefetch prefetch) {
  using C = Compute<T>;
  using V = Vec<T>;
  constexpr int K = Map::kCoefs;
  constexpr int64_t W = kVecElems<T>;
  constexpr uintptr_t kAlign = sizeof(typename Types<T>::RawForVec);
  if (e >= end) return;  // also keeps empty tensors (inner == 0) away from the divisions below
  // Locals, not the callers' structs: a streaming store may alias anything for the compiler, and
  // would make it reload every size and coefficient pointer from memory after each vector. (The
  // map's own pointers stay behind the reference: see kShortSegmentElems in docs/tuning.md.)
  const Geometry g = geometry;
  const C* coefs[K];
  for (int k = 0; k < K; ++k) coefs[k] = cf.by_channel[k];
  const int64_t origin = cf.origin;  // of the coefficient arrays: channel c is at c - origin
  T* const out = map.out;
  const int64_t ahead = prefetch.ahead;
  const int64_t prefetch_end = prefetch.end;
  auto aligned = [&](int64_t at) BNC_INLINE {
    return !Stream || reinterpret_cast<uintptr_t>(out + at) % kAlign == 0;
  };
  if (!cf.width) {
    // Segments of one channel (inner >= 16 >= W, so a vector crosses at most one segment end):
    // coefficients broadcast per segment, and a vector that crosses into the next segment blends
    // both channels' coefficients. The loop stays on aligned vectors across segment ends, so
    // streaming stores always write whole vectors. Channel and segment end are tracked
    // incrementally (no division per segment).
    int64_t c = (e / g.inner) % g.channels;
    int64_t segment_end = (e / g.inner + 1) * g.inner;
    C ks[K];
    V kv[K];
    auto set_channel = [&](int64_t channel) BNC_INLINE {
      for (int k = 0; k < K; ++k) {
        ks[k] = coefs[k][channel - origin];
        kv[k] = broadcast<V>(ks[k]);
      }
    };
    auto advance = [&]() BNC_INLINE {
      c = c + 1 == g.channels ? 0 : c + 1;
      segment_end += g.inner;
      set_channel(c);
    };
    set_channel(c);
    for (; e < end && !aligned(e); ++e) {
      if (e == segment_end) advance();
      out[e] = narrow<T>(map.one(e, ks));
    }
    const V lane_index = iota<V, C>();
    // A vector that crosses into the next segment: lanes below segment_end - e belong to
    // channel c, the others to the next channel.
    auto put_crossing = [&]() BNC_INLINE {
      const auto in_this = lane_index < static_cast<C>(segment_end - e);
      V mixed[K];
      const int64_t next = c + 1 == g.channels ? 0 : c + 1;
      for (int k = 0; k < K; ++k)
        mixed[k] = in_this ? kv[k] : broadcast<V>(coefs[k][next - origin]);
      put<Stream>(out + e, map.vec(e, mixed));
      advance();
    };
    if (g.inner < kShortSegmentElems) {
      // Short segments: their whole vectors run in a loop of their own, on a copy of the
      // coefficients that no lambda holds (the per-vector segment checks cost more than the
      // data there).
      while (e + W <= end) {
        if (e == segment_end) advance();
        const int64_t last = min64(segment_end, end) - W;
        V segment_kv[K];
        for (int k = 0; k < K; ++k) segment_kv[k] = kv[k];
        for (; e <= last; e += W) {
          if (e < prefetch_end) map.prefetch(e + ahead, W);
          put<Stream>(out + e, map.vec(e, segment_kv));
        }
        if (e + W > end) break;
        if (e == segment_end) continue;
        if (e < prefetch_end) map.prefetch(e + ahead, W);
        put_crossing();
        e += W;
      }
    } else {
      // Longer segments: one loop with the checks, which paces the prefetches of the pipelined
      // schedule (apply_reducing_next) better (docs/tuning.md, kShortSegmentElems).
      for (; e + W <= end; e += W) {
        if (e < prefetch_end) map.prefetch(e + ahead, W);
        if (e == segment_end) advance();
        if (e + W <= segment_end) {
          put<Stream>(out + e, map.vec(e, kv));
          continue;
        }
        put_crossing();
      }
    }
    for (; e < end; ++e) {
      if (e == segment_end) advance();
      out[e] = narrow<T>(map.one(e, ks));
    }
    return;
  }
  const C* lane_coef[K];
  for (int k = 0; k < K; ++k) lane_coef[k] = cf.by_lane[k];
  const int64_t width = cf.width;
  // Lane of element e, from the arrays' first (a chunk's arrays hold its lanes only: its pieces
  // never reach the row's end, so j never wraps there).
  int64_t j = e % width - origin * cf.inner;
  auto one = [&]() BNC_INLINE {
    C ks[K];
    for (int k = 0; k < K; ++k) ks[k] = lane_coef[k][j];
    out[e] = narrow<T>(map.one(e, ks));
    ++e;
    if (++j == width) j = 0;
  };
  while (e < end && !aligned(e)) one();
  for (; e + W <= end; e += W) {
    if (e < prefetch_end) map.prefetch(e + ahead, W);
    V kv[K];
    for (int k = 0; k < K; ++k) kv[k] = load<V>(lane_coef[k] + j);
    put<Stream>(out + e, map.vec(e, kv));
    j += W;
    while (j >= width) j -= width;  // no division: rows are at least a few vectors long
  }
  while (e < end) one();
}

// What apply_task prefetches: nothing; its own inputs ahead (they come from memory); or the
// inputs of the task the thread reduces next (the same rows of chunk + next_chunks), so that its
// reads from memory overlap this task's writes instead of following them.
enum class TaskPrefetch { none, ahead, next_chunk };

// Applies `map` on task (chunk, row_block): a contiguous range when chunks are whole rows, else
// one piece per row, the next piece prefetched.
template <bool Stream, class T, class Map>
void apply_task(const Plan& p, const Map& map, const Coefs<T, Map::kCoefs>& coefs, int64_t chunk,
                int64_t row_block, TaskPrefetch prefetch, int64_t next_chunks = 1) {
  const Geometry& g = p.g;
  const auto [c0, c1, o0, o1, i0, i1] = TaskBounds(p, chunk, row_block);
  const int64_t row = g.channels * g.inner;
  const int64_t block = i1 - i0;  // of each segment (the whole segment unless cut)
  auto fetch_for = [&](int64_t begin, int64_t end) {
    if (prefetch == TaskPrefetch::ahead) return ApplyPrefetch::within<T>(end);
    if (prefetch == TaskPrefetch::next_chunk && chunk + next_chunks < p.num_chunks) {
      // Row piece [begin, end) of this chunk; that of the next task's chunk in the same row
      // starts next_chunks * chunk_channels * inner elements later, and may be narrower (the
      // last chunk).
      const int64_t next_c0 = c0 + next_chunks * p.chunk_channels;
      const int64_t next_c1 = min64(g.channels, next_c0 + p.chunk_channels);
      return ApplyPrefetch{next_chunks * p.chunk_channels * g.inner,
                           begin + (p.inner_blocks > 1 ? block : (next_c1 - next_c0) * g.inner)};
    }
    return ApplyPrefetch{};
  };
  if (p.inner_blocks > 1) {  // one channel per chunk, its segments cut into blocks
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t piece = (o * g.channels + c0) * g.inner + i0;
      apply_range<Stream, T>(g, map, coefs, piece, piece + block, fetch_for(piece, piece + block));
    }
    return;
  }
  if (p.num_chunks == 1) {
    apply_range<Stream, T>(g, map, coefs, o0 * row, o1 * row, fetch_for(o0 * row, o1 * row));
    return;
  }
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t piece = (o * g.channels + c0) * g.inner;
    const int64_t piece_end = piece + (c1 - c0) * g.inner;
    if (o + 1 < o1) map.prefetch(piece + row, (c1 - c0) * g.inner);
    apply_range<Stream, T>(g, map, coefs, piece, piece_end, fetch_for(piece, piece_end));
  }
}

// Fused chunks of the segment family whose input comes from memory: writes `chunk` a row at a
// time and, after each row, reduces the same row of `next` (its sums to s.chunk_a/chunk_b, with
// its shifts next_shifts[c - next's first channel]), whose inputs the row's apply prefetches: a
// thread reads, writes and computes at once. Same sums, same order: the rows of `next` are added
// in order, as reduce_task adds them.
template <bool Stream, class T, class Terms, class Map>
void apply_reducing_next(const Plan& p, const Terms& terms, const double* next_shifts,
                         const Map& map, const Coefs<T, Map::kCoefs>& coefs, int64_t chunk,
                         int64_t next, const Scratch& s) {
  const Geometry& g = p.g;
  const TaskBounds now(p, chunk, 0), later(p, next, 0);
  const int64_t width = (now.c1 - now.c0) * g.inner;
  const int64_t next_width = (later.c1 - later.c0) * g.inner;
  const int64_t offset = (later.c0 - now.c0) * g.inner;  // from a row's piece of chunk to next's
  zero_segment_lanes(s, later.c1 - later.c0);
  for (int64_t o = 0; o < g.outer; ++o) {
    const int64_t piece = (o * g.channels + now.c0) * g.inner;
    apply_range<Stream, T>(g, map, coefs, piece, piece + width,
                           ApplyPrefetch{offset, piece + next_width});
    reduce_segment_rows(g, terms, next_shifts, later.c0, later.c1, o, o + 1, false, s);
  }
  segment_sums(s, later.c1 - later.c0, s.chunk_a, s.chunk_b);
}

// Whether an apply alone keeps its coefficients per block of channels, in per-thread scratch:
// when per-channel arrays would take a quarter of the input or more (many channels, few rows).
template <class T, int K>
bool apply_by_blocks(const Geometry& g) {
  const int64_t coef_bytes =
      (Coefs<T, K>::channel_length(g, g.channels) + Coefs<T, K>::lane_length(g, g.channels)) *
      K * static_cast<int64_t>(sizeof(Compute<T>));
  return g.channels > kChunkElems && 4 * coef_bytes >= g.size() * static_cast<int64_t>(sizeof(T));
}

// Applies `map` to the whole tensor. set_coefs(c, k, j) fills channel c's coefficients at
// k[.][j]. Either every channel's coefficients first, then one contiguous range per thread in
// memory order (no reduction to stay close to), boundaries on multiples of 64 elements; or
// (apply_by_blocks) blocks of up to kChunkElems lanes of each row, split among the threads, each
// block's coefficients computed by its thread (once: every row of the block is written then).
// The same coefficients and the same map: the same bits either way.
template <class T, class Map, class SetCoefs>
int64_t apply_everywhere(const Geometry& g, const Map& map, SetCoefs&& set_coefs, int num_threads) {
  constexpr int K = Map::kCoefs;
  // One thread per kSerialBytes of work at most (and none below it).
  const int64_t work_threads = max64(1, g.size() * static_cast<int64_t>(sizeof(T)) / kSerialBytes);
  const int threads = static_cast<int>(min64(max64(num_threads, 1), work_threads));
  const bool by_blocks = apply_by_blocks<T, K>(g);
  ApplyState<T, K> st;
  if (!st.allocate_apply(g, by_blocks ? threads : 0, by_blocks)) return -1;
  const bool stream = streaming_apply_output(g, sizeof(T));
  if (by_blocks) {
    const int64_t block = ChunkScratch<T, K>::max_channels(g);
    const int64_t blocks = ceil_div(g.channels, block);
    auto body = [&](int tid, int nth) {
      const Scratch s = st.scratch_of(tid);
      Coefs<T, K> mine = ChunkScratch<T, K>::coefs(g, s);
      int64_t begin, end;
      split_range(blocks, tid, nth, begin, end);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t c0 = b * block, c1 = min64(g.channels, c0 + block);
        mine.origin = c0;
        for (int64_t c = c0; c < c1; ++c) {
          set_coefs(c, mine.by_channel, c - c0);
          mine.spread(c);
        }
        for (int64_t o = 0; o < g.outer; ++o) {
          const int64_t piece = (o * g.channels + c0) * g.inner;
          const int64_t piece_end = piece + (c1 - c0) * g.inner;
          if (stream)
            apply_range<true, T>(g, map, mine, piece, piece_end, ApplyPrefetch::within<T>(piece_end));
          else
            apply_range<false, T>(g, map, mine, piece, piece_end, ApplyPrefetch{});
        }
      }
      if (stream) stream_fence();
    };
    run_team(threads, body);
    return 0;
  }
  for (int64_t c = 0; c < g.channels; ++c) {
    set_coefs(c, st.coefs.by_channel, c);
    st.coefs.spread(c);
  }
  const int64_t total = g.size();
  auto body = [&](int tid, int nth) {
    const int64_t begin = total / 64 * tid / nth * 64;
    const int64_t end = tid + 1 == nth ? total : total / 64 * (tid + 1) / nth * 64;
    if (stream) {  // too large for the cache: the input comes from memory too
      apply_range<true, T>(g, map, st.coefs, begin, end, ApplyPrefetch::within<T>(end));
      stream_fence();
    } else {
      apply_range<false, T>(g, map, st.coefs, begin, end, ApplyPrefetch{});
    }
  };
  run_team(threads, body);
  return 0;
}

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
