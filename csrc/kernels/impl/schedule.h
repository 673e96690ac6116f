// The reduce -> finalize -> apply schedule shared by every operation that reduces: fused chunks
// claimed dynamically, or groups of chunks reduced, merged in a fixed order, then applied in
// reverse.
#pragma once

#include "kernels/impl/apply.h"

namespace bnc {
namespace BNC_ISA {
namespace {

// The reduce -> finalize -> apply driver shared by every operation that reduces (an operation
// that only reduces passes NoMap: nothing is applied).
// finalize(c0, c1, sums_a, sums_b, last) turns the sums of channels [c0, c1) (sums_a[c - c0])
// into their coefficients (st.coefs[k][c]) and returns true; or, unless `last`, it may instead
// move some channels' shifts (st.shifts[c]) and return false: then the channels of that chunk
// (fused) or group are summed once more before their apply. A range at a time, so that the
// per-channel arithmetic vectorizes (with many channels of few elements each it is a good part
// of the work).
template <bool Stream, class T, class Terms, class Finalize, class Map>
void reduce_finalize_apply(const Plan& p, const Terms& terms, Finalize& finalize, const Map& map,
                           ApplyState<T, Map::kCoefs>& st, int threads) {
  const Geometry& g = p.g;
  const TaskPrefetch sweep_prefetch = second_sweep_from_memory(p, sizeof(T), Map::kInputs)
                                          ? TaskPrefetch::ahead
                                          : TaskPrefetch::none;
  const int64_t task_input_bytes = p.rows_per_block * p.chunk_channels * p.inner_per_block *
                                   static_cast<int64_t>(sizeof(T)) * Map::kInputs;
  auto finalize_range = [&](int64_t c0, int64_t c1, const double* sums_a, const double* sums_b,
                            bool last) {
    if (!finalize(c0, c1, sums_a, sums_b, last)) return false;
    for (int64_t c = c0; c < c1; ++c) st.lanes.spread(c, st.coefs);
    return true;
  };
  auto body = [&](int tid, int nth) {
    const Scratch s = scratch_for(st.scratch, tid);
    if (p.fused) {
      // Each thread claims its next chunk before it writes this one, so that it can fetch the
      // next one meanwhile, and no thread waits for one slowed by its neighbours.
      auto claim = [&]() { return claim_next(st.claimed_chunks); };
      // Segment family, input from memory: the next chunk is reduced while this one is written.
      const bool pipelined = Stream && !p.row_family;
      bool reduced = false;  // the chunk's sums are in s.chunk_a/chunk_b already
      for (int64_t chunk = claim(), next; chunk < p.num_chunks; chunk = next) {
        const int64_t c0 = chunk * p.chunk_channels;
        const int64_t c1 = min64(g.channels, c0 + p.chunk_channels);
        if (!reduced) reduce_task(p, terms, st.shifts, chunk, 0, s, s.chunk_a, s.chunk_b);
        if (!finalize_range(c0, c1, s.chunk_a, s.chunk_b, false)) {
          reduce_task(p, terms, st.shifts, chunk, 0, s, s.chunk_a, s.chunk_b);
          finalize_range(c0, c1, s.chunk_a, s.chunk_b, true);
        }
        next = claim();
        if constexpr (Map::kWrites) {
          reduced = pipelined && next < p.num_chunks;
          if (reduced) {
            apply_reducing_next<Stream, T>(p, terms, st.shifts, map, st.coefs, st.lanes, chunk,
                                           next, s);
            continue;
          }
          // An input too large for the cache (Stream) comes from memory: the next chunk is
          // fetched while this one is written.
          apply_task<Stream, T>(p, map, st.coefs, st.lanes, chunk, 0,
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
        reduce_task(p, terms, st.shifts, chunk, rb, s, st.partial_a + rb * g.channels + c0,
                    st.partial_b + rb * g.channels + c0);
      };
      // Row family: threads claim tasks as they go (a task's sums go to its own partials). The
      // segment family keeps a fixed split: its next-group prefetch fetches the inputs of the
      // thread's own next task.
      const bool claim = p.row_family;
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
      // miss the cache at every step.
      auto merge_and_finalize = [&](bool last) {
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
        const int64_t c0 = c_first + cb;
        return finalize_range(c0, c_first + ce, sums_a + c0, sums_b + c0, last);
      };
      reduce_group(true);
      team_barrier(nth);
      int64_t* const again = st.again + first / p.chunks_per_group;
      if (!merge_and_finalize(false)) __atomic_store_n(again, 1, __ATOMIC_RELAXED);
      team_barrier(nth);
      if (__atomic_load_n(again, __ATOMIC_RELAXED)) {  // every thread sees the same flag here
        reduce_group(false);
        team_barrier(nth);
        merge_and_finalize(true);
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
          apply_task<Stream, T>(p, map, st.coefs, st.lanes, first + t / p.num_row_blocks,
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
template <class T, class Terms, class Finalize, class Map>
void run_schedule(const Plan& p, const Terms& terms, Finalize& finalize, const Map& map,
                  ApplyState<T, Map::kCoefs>& st, int threads) {
  if (Map::kWrites && streaming_output(p.g, sizeof(T)))
    reduce_finalize_apply<true, T>(p, terms, finalize, map, st, threads);
  else
    reduce_finalize_apply<false, T>(p, terms, finalize, map, st, threads);
}

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
