// The plan: how a tensor is cut into tasks (chunks of channels x blocks of rows), from the shape
// and element size alone, so that every sum has the same order for any thread count.
#pragma once

#include "kernels/batch_norm.h"
#include "kernels/impl/simd.h"

namespace bnc {
namespace BNC_ISA {
namespace {

struct Plan {
  Geometry g;
  bool row_family;
  int64_t chunk_channels;
  int64_t rows_per_block;
  int64_t num_chunks;
  int64_t num_row_blocks;
  int64_t chunks_per_group;
  bool fused;
  int64_t fold = 1;  // row family: rows per super-row (reduce_task), 1 unless rows are narrow
  // Segment family, one channel per chunk, segments longer than kTaskBytes: each segment is cut
  // into inner blocks, so that one long channel still makes many tasks. A "row block" (the
  // index of a task within its chunk, and of its partial sums) is then (row, inner block).
  int64_t inner_blocks = 1;
  int64_t inner_per_block = 0;  // elements of a segment per task (the whole segment unless cut)
  int64_t num_tasks() const { return num_chunks * num_row_blocks; }
};

inline Plan make_plan(Geometry g, int64_t elem_bytes) {
  Plan p;
  p.g = g;
  p.row_family = g.inner < kSegmentMinInner;
  const int64_t inner = max64(g.inner, 1);  // empty tensors: any valid plan does no work
  const int64_t channel_bytes = max64(1, g.outer * inner * elem_bytes);
  const int64_t max_chunk = max64(1, kChunkElems / inner);
  const bool large_fuse = channel_bytes > kFuseBytes &&
                          g.size() * elem_bytes >= kLargeFuseMinChunks * kLargeFuseBytes;
  const int64_t fuse_bytes = large_fuse ? kLargeFuseBytes : kFuseBytes;
  const int64_t fused_chunk = fuse_bytes / channel_bytes;  // 0: one channel does not fit
  const bool fuse_shorter_runs =
      fused_chunk >= 1 && fused_chunk * inner * elem_bytes >= kMinFusedRunBytes;
  const int64_t min_chunk =
      fuse_shorter_runs ? fused_chunk : ceil_div(kMinRunBytes, inner * elem_bytes);
  int64_t chunk = max64(fused_chunk, min_chunk);
  // Row family, chunk too big to fuse: its pieces of rows are a row apart, and the wider they
  // are the better they stream, so the widest chunk (kChunkElems lanes, or the whole row) is
  // taken (docs/tuning.md, kChunkElems).
  if (p.row_family && chunk * channel_bytes > fuse_bytes) chunk = max_chunk;
  chunk = min64(min64(chunk, max_chunk), g.channels);
  p.chunk_channels = max64(chunk, 1);
  p.num_chunks = ceil_div(g.channels, p.chunk_channels);
  const int64_t chunk_bytes = p.chunk_channels * channel_bytes;
  p.fused = chunk_bytes <= fuse_bytes;
  if (p.fused) {
    p.rows_per_block = max64(g.outer, 1);
  } else {
    const int64_t row_bytes = p.chunk_channels * inner * elem_bytes;
    p.rows_per_block = max64(1, kTaskBytes / row_bytes);
    if (p.row_family)
      p.rows_per_block = max64(p.rows_per_block,
                               min64(kMinBlockRows, ceil_div(g.outer, kMinBlockRowsTasks)));
    if (ceil_div(g.outer, p.rows_per_block) > kMaxRowBlocks)
      p.rows_per_block = ceil_div(g.outer, kMaxRowBlocks);
  }
  // Narrow whole rows (one chunk) are reduced kFoldRows rows at a time, as one super-row:
  // rows of 3 or 7 lanes were summed element by element. Row blocks are whole super-rows
  // (except the last).
  if (p.row_family && p.num_chunks == 1 && g.channels * inner < kFoldBelowWidth) {
    p.fold = kFoldRows;
    if (!p.fused) p.rows_per_block = ceil_div(p.rows_per_block, p.fold) * p.fold;
  }
  p.inner_per_block = g.inner;
  if (!p.row_family && !p.fused && p.chunk_channels == 1 && g.inner * elem_bytes > kTaskBytes) {
    // Blocks of whole lanes (multiples of kLanes elements), at most kMaxRowBlocks tasks per
    // channel; a task is one row's block.
    p.rows_per_block = 1;
    const int64_t blocks = min64(ceil_div(g.inner * elem_bytes, kTaskBytes),
                                 max64(1, kMaxRowBlocks / max64(g.outer, 1)));
    p.inner_per_block = ceil_div(ceil_div(g.inner, blocks), kLanes) * kLanes;
    p.inner_blocks = ceil_div(g.inner, p.inner_per_block);
  }
  p.num_row_blocks = max64(1, ceil_div(g.outer, p.rows_per_block)) * p.inner_blocks;
  p.chunks_per_group = max64(1, kGroupBytes / chunk_bytes);
  return p;
}

// Threads for a reduce -> apply call: one below kSerialBytes, else at most one per task.
inline int threads_for(const Plan& p, int64_t elem_bytes, int requested) {
  if (requested < 1) requested = 1;
  if (p.g.size() * elem_bytes < kSerialBytes) return 1;
  const int64_t tasks = p.fused ? p.num_chunks : p.num_tasks();
  return static_cast<int>(min64(requested, max64(tasks, 1)));
}

// The channels [c0, c1), rows [o0, o1) and elements [i0, i1) of each segment of task
// (chunk, row_block).
struct TaskBounds {
  int64_t c0, c1, o0, o1, i0, i1;
  TaskBounds(const Plan& p, int64_t chunk, int64_t row_block)
      : c0(chunk * p.chunk_channels),
        c1(min64(p.g.channels, c0 + p.chunk_channels)),
        o0(row_block / p.inner_blocks * p.rows_per_block),
        o1(min64(p.g.outer, o0 + p.rows_per_block)),
        i0(row_block % p.inner_blocks * p.inner_per_block),
        i1(min64(p.g.inner, i0 + p.inner_per_block)) {}
};

// Outputs of at least this many bytes are written with non-temporal stores (set from the L3
// cache size in dispatch.cpp): they would not stay in cache for the next layer anyway. The same
// size tells the reduce that its input comes from memory rather than cache.
inline bool streaming_output(const Geometry& g, int64_t elem_bytes) {
  return g.size() * elem_bytes >= stream_threshold_bytes();
}

// The same for an apply alone, which reads its input once: kApplyStreamFactor times further.
inline bool streaming_apply_output(const Geometry& g, int64_t elem_bytes) {
  return g.size() * elem_bytes >= stream_threshold_bytes() * kApplyStreamFactor;
}

// Whether the second sweep (unfused) must read its inputs from memory: a group of chunks of every
// input is as large as L3, so its first-read part is gone by the time it is applied.
inline bool second_sweep_from_memory(const Plan& p, int64_t elem_bytes, int inputs) {
  if (p.fused) return false;
  const int64_t group_channels = min64(p.chunks_per_group * p.chunk_channels, p.g.channels);
  return group_channels * p.g.outer * p.g.inner * elem_bytes * inputs >= l3_bytes();
}

// The reverse sweep meets the tasks reduced first last: a task whose inputs were read long ago
// (later tasks' inputs, twice, at least 1/kEvictedL3Fraction of L3) is partly gone from L3.
inline bool evicted_from_l3(int64_t later_tasks, int64_t task_input_bytes) {
  return 2 * later_tasks * task_input_bytes >= l3_bytes() / kEvictedL3Fraction;
}
}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
