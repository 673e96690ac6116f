// Workspace: one allocation per call for per-channel coefficients, shifts, row-block partials
// and per-thread scratch (no C++ allocation and no exceptions inside parallel regions).
#pragma once

#include <cstdint>
#include <cstdlib>

#include "kernels/impl/maps.h"
#include "kernels/impl/plan.h"

namespace bnc {
namespace BNC_ISA {
namespace {

// Per-thread scratch: accumulators and expanded per-lane coefficients for one task.
struct Scratch {
  double* acc_a;     // kChunkElems lanes (row family) or 16 per channel (segment family)
  double* acc_b;
  double* shift;     // kChunkElems
  double* chunk_a;   // per channel of the chunk (fused path)
  double* chunk_b;
  double* redo_a;    // kChunkElems each: a task's lanes summed again in double (reduce_task)
  double* redo_b;
  float* part_a;     // kChunkElems each: float partial sums and shifts (row family)
  float* part_b;
  float* part_shift;
};
// Seven arrays of kChunkElems doubles, three of kChunkElems floats.
constexpr int64_t kScratchDoubles = 7 * kChunkElems + (3 * kChunkElems + 1) / 2;

inline Scratch scratch_for(double* base, int tid) {
  double* p = base + static_cast<int64_t>(tid) * kScratchDoubles;
  Scratch s;
  s.acc_a = p;
  s.acc_b = p + kChunkElems;
  s.shift = p + 2 * kChunkElems;
  s.chunk_a = p + 3 * kChunkElems;
  s.chunk_b = p + 4 * kChunkElems;
  s.redo_a = p + 5 * kChunkElems;
  s.redo_b = p + 6 * kChunkElems;
  s.part_a = reinterpret_cast<float*>(p + 7 * kChunkElems);
  s.part_b = s.part_a + kChunkElems;
  s.part_shift = s.part_b + kChunkElems;
  return s;
}

// One malloc per call, carved into cache-line-aligned runs.
struct Workspace {
  void* block = nullptr;
  char* base = nullptr;  // block rounded up to a cache line
  int64_t size = 0;
  int64_t used = 0;
  ~Workspace() { std::free(block); }
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  static int64_t rounded(int64_t bytes) { return (bytes + 63) / 64 * 64; }
  // Reserves room for `count` objects of type U (first pass: sizes only).
  template <class U>
  void reserve(int64_t count) {
    size += rounded(count * static_cast<int64_t>(sizeof(U)));
  }
  bool allocate() {
    block = std::malloc(static_cast<size_t>(size + 64));
    if (!block) return false;
    base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(block) + 63) & ~uintptr_t{63});
    return true;
  }
  // Carves `count` objects of type U (double or float), each run starting on a cache line;
  // every take must match a reserve of the same count.
  template <class U>
  U* take(int64_t count) {
    U* p = reinterpret_cast<U*>(base + used);
    used += rounded(count * static_cast<int64_t>(sizeof(U)));
    return p;
  }
};

// Everything one reduce -> finalize -> apply call needs besides its inputs: per-channel
// coefficients (and lanes), shifts, row-block partials, per-thread scratch. One allocation.
template <class T, int K>
struct ApplyState {
  Compute<T>* coefs[K];
  LaneCoefs<T, K> lanes;
  double* shifts = nullptr;
  double* partial_a = nullptr;
  double* partial_b = nullptr;
  double* scratch = nullptr;
  int64_t* again = nullptr;  // per group of chunks: summed once more (reduce_finalize_apply)
  int64_t* claimed = nullptr;  // per group of chunks: tasks claimed so far, to reduce and apply
  int64_t* claimed_chunks = nullptr;  // fused chunks claimed so far
  Workspace ws;

  // extra_doubles: further per-channel double arrays the caller takes afterwards.
  bool allocate(const Plan& p, int threads, int extra_doubles) {
    const Geometry& g = p.g;
    const int64_t partials = p.fused ? 0 : g.channels * p.num_row_blocks;
    const int64_t lane_length = LaneCoefs<T, K>::length(g);
    for (int k = 0; k < K; ++k) ws.reserve<Compute<T>>(g.channels);
    for (int k = 0; k < K; ++k) ws.reserve<Compute<T>>(lane_length);
    for (int k = 0; k <= extra_doubles; ++k) ws.reserve<double>(g.channels);
    ws.reserve<double>(partials);
    ws.reserve<double>(partials);
    ws.reserve<double>(threads * kScratchDoubles);
    const int64_t groups = ceil_div(p.num_chunks, p.chunks_per_group);
    ws.reserve<int64_t>(groups);
    ws.reserve<int64_t>(2 * groups + 1);
    if (!ws.allocate()) return false;
    for (int k = 0; k < K; ++k) coefs[k] = ws.take<Compute<T>>(g.channels);
    for (int k = 0; k < K; ++k) lanes.lanes[k] = ws.take<Compute<T>>(lane_length);
    lanes.width = lane_length ? g.channels * g.inner : 0;
    lanes.inner = g.inner;
    shifts = ws.take<double>(g.channels);
    partial_a = ws.take<double>(partials);
    partial_b = ws.take<double>(partials);
    scratch = ws.take<double>(threads * kScratchDoubles);
    again = ws.take<int64_t>(groups);
    claimed = ws.take<int64_t>(2 * groups + 1);
    claimed_chunks = claimed + 2 * groups;
    for (int64_t i = 0; i < groups; ++i) again[i] = 0;
    for (int64_t i = 0; i < 2 * groups + 1; ++i) claimed[i] = 0;
    return true;
  }
};

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
