// The reduce -> finalize -> apply schedule shared by every operation that reduces: fused chunks
// claimed dynamically, or groups of chunks reduced, merged in a fixed order, then applied in
// reverse.
#pragma once

#include <utility>

#include "kernels/impl/apply.h"

namespace bnc {
namespace BNC_ISA {
namespace {

// What a finalize sees of channels [c0, c1): their sums, shifts, coefficient arrays and
// temporaries, channel c at index c - c0 of each (per-thread scratch or per-channel arrays).
template <class T, int K>
struct ChannelRange {
  int64_t c0, c1;
  const double* sums_a;
  const double* sums_b;
  double* shifts;
  Compute<T>* coefs[K];
  double* temps[kFinalizeTemps];
};

// The reduce -> finalize -> apply driver shared by every operation that reduces (an operation
// that only reduces passes NoMap: nothing is applied).
// pivots(c0, c1, shifts) writes the shifts of channels [c0, c1) (shifts[c - c0]) before their
// reduce. finalize(range, last) turns the sums of a ChannelRange into its coefficients and
// returns true; or, unless `last`, it may instead move some channels' shifts and return false:
// then the channels of that chunk (fused) or group are summed once more before their apply.
// Each channel is finalized with a true return exactly once, so a finalize may write outputs
// (running statistics) then. A range at a time, so that the per-channel arithmetic vectorizes
// (with many channels of few elements each it is a good part of the work).
template <bool Stream, class T, class Terms, class Pivots, class Finalize, class Map>
void reduce_finalize_apply(const Plan& p, const Terms& terms, const Pivots& pivots,
                           Finalize& finalize, const Map& map, ApplyState<T, Map::kCoefs>& st,
                           int threads) {
  constexpr int K = Map::kCoefs;
  const Geometry& g = p.g;
  const TaskPrefetch sweep_prefetch = second_sweep_from_memory(p, sizeof(T), Map::kInputs)
                                          ? TaskPrefetch::ahead
                                          : TaskPrefetch::none;
  const int64_t task_input_bytes = p.rows_per_block * p.chunk_channels * p.inner_per_block *
                                   static_cast<int64_t>(sizeof(T)) * Map::kInputs;
  auto finalize_range = [&](const Coefs<T, K>& coefs, const ChannelRange<T, K>& r, bool last) {
    if (!finalize(r, last)) return false;
    if constexpr (Map::kWrites)
      for (int64_t c = r.c0; c < r.c1; ++c) coefs.spread(c);
    return true;
  };
  // The unfused schedule's channels [c0, c1) (at most kChunkElems), in the per-channel arrays,
  // with the thread's temporaries.
  auto global_range = [&](int64_t c0, int64_t c1, const Scratch& s) {
    ChannelRange<T, K> r{c0, c1, st.partial_a + c0, st.partial_b + c0, st.shifts + c0, {}, {}};
    for (int k = 0; k < K; ++k) r.coefs[k] = st.coefs.by_channel[k] + c0;
    for (int t = 0; t < kFinalizeTemps; ++t) r.temps[t] = s.temps[t];
    return r;
  };
  if (!p.fused) pivots(int64_t{0}, g.channels, st.shifts);
  auto body = [&](int tid, int nth) {
    const Scratch s = st.scratch_of(tid);
    if (p.fused) {
      // One chunk at a time in the thread's scratch: shifts (this chunk's and, pipelined, the
      // next one's), coefficients and finalize temporaries.
      Coefs<T, K> mine = ChunkScratch<T, K>::coefs(g, s);
      double* shifts = s.shifts_now;
      double* next_shifts = s.shifts_next;
      // Each thread claims its next chunk before it writes this one, so that it can fetch the
      // next one meanwhile, and no thread waits for one slowed by its neighbours.
      auto claim = [&]() { return claim_next(st.claimed_chunks); };
      // Segment family, input from memory: the next chunk is reduced while this one is written.
      const bool pipelined = Stream && !p.row_family;
      bool reduced = false;  // the chunk's sums are in s.chunk_a/chunk_b already
      for (int64_t chunk = claim(), next; chunk < p.num_chunks; chunk = next) {
        const int64_t c0 = chunk * p.chunk_channels;
        const int64_t c1 = min64(g.channels, c0 + p.chunk_channels);
        mine.origin = c0;
        if (!reduced) {
          pivots(c0, c1, shifts);
          reduce_task(p, terms, shifts, chunk, 0, s, s.chunk_a, s.chunk_b);
        }
        ChannelRange<T, K> r{c0, c1, s.chunk_a, s.chunk_b, shifts, {}, {}};
        for (int k = 0; k < K; ++k) r.coefs[k] = mine.by_channel[k];
        for (int t = 0; t < kFinalizeTemps; ++t) r.temps[t] = s.temps[t];
        if (!finalize_range(mine, r, false)) {
          reduce_task(p, terms, shifts, chunk, 0, s, s.chunk_a, s.chunk_b);
          finalize_range(mine, r, true);
        }
        next = claim();
        if constexpr (Map::kWrites) {
          reduced = pipelined && next < p.num_chunks;
          if (reduced) {
            const TaskBounds later(p, next, 0);
            pivots(later.c0, later.c1, next_shifts);
            apply_reducing_next<Stream, T>(p, terms, next_shifts, map, mine, chunk, next, s);
            std::swap(shifts, next_shifts);
            continue;
          }
          // An input too large for the cache (Stream) comes from memory: the next chunk is
          // fetched while this one is written.
          apply_task<Stream, T>(p, map, mine, chunk, 0,
                                Stream && next < p.num_chunks ? TaskPrefetch::next_chunk
                                                              : TaskPrefetch::none,
                                next - chunk);
        }
      }
      if (Stream) stream_fence();
      return;
    }
    for (int64_t first = 0; first < p.num_chunks; first += p.chunks_per_group) {
      const int64_t chunks = min64(p.chunks_per_group, p.num_chunks - first);
      const int64_t tasks = chunks * p.num_row_blocks;
      int64_t begin, end;
      split_range(tasks, tid, nth, begin, end);
      auto reduce_one = [&](int64_t t) {
        const int64_t chunk = first + t / p.num_row_blocks;
        const int64_t rb = t % p.num_row_blocks;
        const int64_t c0 = chunk * p.chunk_channels;
        reduce_task(p, terms, st.shifts + c0, chunk, rb, s, st.partial_a + rb * g.channels + c0,
                    st.partial_b + rb * g.channels + c0);
      };
      // Row family from memory: threads claim tasks as they go (a task's sums go to its own
      // partials). Otherwise a fixed split: the segment family's next-group prefetch fetches the
      // inputs of the thread's own next task, and a tensor that stays in cache keeps each thread
      // on the same rows in the reduce, the apply and the next call of the same shape (the next
      // layer), instead of reading rows another core has just written (docs/tuning.md).
      const bool claim = p.row_family && Stream;
      int64_t* const claimed = st.claimed + 2 * (first / p.chunks_per_group);
      auto reduce_group = [&](bool first_time) {
        if (claim && first_time) {
          for (int64_t t; (t = claim_next(&claimed[0])) < tasks;)
            reduce_one(t);
        } else {
          for (int64_t t = begin; t < end; ++t) reduce_one(t);
        }
      };
      const int64_t c_first = first * p.chunk_channels;
      const int64_t c_last = min64(g.channels, (first + chunks) * p.chunk_channels);
      int64_t cb, ce;
      split_range(c_last - c_first, tid, nth, cb, ce);
      // Row blocks merged in order into the first block's partials, a whole row of partials at a
      // time: walking one channel down the row blocks (rows channels * 8 bytes apart) would
      // miss the cache at every step. Then the thread's channels are finalized kChunkElems at a
      // time (its temporaries' size); `done` marks those finalized already, bit i for the i-th
      // (a group has at most kGroupBytes / kFuseBytes chunks of at most kChunkElems channels).
      static_assert(kGroupBytes / kFuseBytes < 63, "a thread's ranges of a group fit in 64 bits");
      auto merge_and_finalize = [&](bool last, uint64_t& done) {
        double* const sums_a = st.partial_a;
        double* const sums_b = st.partial_b;
        for (int64_t rb = 1; rb < p.num_row_blocks; ++rb) {
          const double* pa = st.partial_a + rb * g.channels;
          const double* pb = st.partial_b + rb * g.channels;
          for (int64_t c = c_first + cb; c < c_first + ce; ++c) {
            sums_a[c] += pa[c];
            sums_b[c] += pb[c];
          }
        }
        bool all = true;
        int i = 0;
        for (int64_t c0 = c_first + cb; c0 < c_first + ce; c0 += kChunkElems, ++i) {
          if (done >> i & 1) continue;  // its results stand: its sums are the same bits again
          const int64_t c1 = min64(c0 + kChunkElems, c_first + ce);
          if (finalize_range(st.coefs, global_range(c0, c1, s), last))
            done |= uint64_t{1} << i;
          else
            all = false;
        }
        return all;
      };
      reduce_group(true);
      team_barrier(nth);
      int64_t* const again = st.again + first / p.chunks_per_group;
      uint64_t done = 0;
      if (!merge_and_finalize(false, done)) __atomic_store_n(again, 1, __ATOMIC_RELAXED);
      team_barrier(nth);
      if (__atomic_load_n(again, __ATOMIC_RELAXED)) {  // every thread sees the same flag here
        reduce_group(false);
        team_barrier(nth);
        merge_and_finalize(true, done);
        team_barrier(nth);
      }
      if constexpr (Map::kWrites) {
        // Reverse order: the tasks reduced last are still in cache. When the next group is as large
        // as this one, a thread's tasks there are the same ones a group further on: their inputs
        // are fetched while this group is written (segment family).
        const bool prefetch_next_group = Stream && !p.row_family &&
                                         first + 2 * p.chunks_per_group <= p.num_chunks;
        auto apply_one = [&](int64_t t, int64_t later_tasks) {
          TaskPrefetch prefetch = sweep_prefetch;
          if (prefetch_next_group)
            prefetch = TaskPrefetch::next_chunk;
          else if (Stream && evicted_from_l3(later_tasks, task_input_bytes))
            prefetch = TaskPrefetch::ahead;
          apply_task<Stream, T>(p, map, st.coefs, first + t / p.num_row_blocks,
                                t % p.num_row_blocks, prefetch, p.chunks_per_group);
        };
        if (claim) {
          for (int64_t k; (k = claim_next(&claimed[1])) < tasks;)
            apply_one(tasks - 1 - k, k);
        } else {
          for (int64_t t = end - 1; t >= begin; --t) apply_one(t, nth * (end - 1 - t));
        }
        if (Stream) stream_fence();
      }
      // No barrier here: the next group touches other channels' partials and coefficients only,
      // and the parallel region's end joins the last group.
    }
  };
  run_team(threads, body);
}

// reduce_finalize_apply with non-temporal stores when the output is too large to stay in cache.
template <class T, class Terms, class Pivots, class Finalize, class Map>
void run_schedule(const Plan& p, const Terms& terms, const Pivots& pivots, Finalize& finalize,
                  const Map& map, ApplyState<T, Map::kCoefs>& st, int threads) {
  if (Map::kWrites && streaming_output(p.g, sizeof(T)))
    reduce_finalize_apply<true, T>(p, terms, pivots, finalize, map, st, threads);
  else
    reduce_finalize_apply<false, T>(p, terms, pivots, finalize, map, st, threads);
}

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
