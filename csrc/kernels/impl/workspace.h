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

// Per-channel temporaries of a finalize (mean, variance, ...), for up to kChunkElems channels at
// a time, in per-thread scratch.
constexpr int kFinalizeTemps = 4;

// Per-thread scratch: accumulators and expanded per-lane coefficients for one task, finalize
// temporaries; and, for the fused schedule and applies by blocks of channels, one chunk's shifts
// and coefficients (so that no per-channel array grows with the tensor: a tensor of many
// channels and few rows would need several times its own size).
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
  double* temps[kFinalizeTemps];  // kChunkElems each
  // Per chunk (see ChunkScratch): where they are not used, null.
  double* shifts_now = nullptr;   // kChunkElems each: this chunk's shifts, the next chunk's
  double* shifts_next = nullptr;
  void* coefs = nullptr;  // the chunk's Coefs arrays
};
// Eleven arrays of kChunkElems doubles, three of kChunkElems floats.
constexpr int64_t kScratchDoubles =
    (7 + kFinalizeTemps) * kChunkElems + (3 * kChunkElems + 1) / 2;

// The per-chunk part of each thread's scratch, for chunks of at most kChunkElems lanes
// (a chunk's channels times inner).
template <class T, int K>
struct ChunkScratch {
  static int64_t max_channels(const Geometry& g) { return max64(1, kChunkElems / max64(g.inner, 1)); }
  static int64_t coef_entries(const Geometry& g) {
    return Coefs<T, K>::channel_length(g, max_channels(g)) +
           Coefs<T, K>::lane_length(g, max_channels(g));
  }
  // Doubles per thread: shifts, coefficients (rounded up to cache lines).
  static int64_t doubles(const Geometry& g) {
    const int64_t coef_doubles =
        ceil_div(K * coef_entries(g) * static_cast<int64_t>(sizeof(Compute<T>)), 64) * 8;
    return 2 * kChunkElems + coef_doubles;
  }
  static void carve(double* p, Scratch& s) {
    s.shifts_now = p;
    s.shifts_next = p + kChunkElems;
    s.coefs = p + 2 * kChunkElems;
  }
  // The thread's Coefs for a chunk's channels (origin set per chunk).
  static Coefs<T, K> coefs(const Geometry& g, const Scratch& s) {
    using C = Compute<T>;
    C* base = static_cast<C*>(s.coefs);
    const int64_t per_channel = Coefs<T, K>::channel_length(g, max_channels(g));
    const int64_t per_lane = Coefs<T, K>::lane_length(g, max_channels(g));
    C* channel_arrays[K];
    C* lane_arrays[K];
    for (int k = 0; k < K; ++k) {
      channel_arrays[k] = base + k * per_channel;
      lane_arrays[k] = base + K * per_channel + k * per_lane;
    }
    Coefs<T, K> c;
    c.place(g, max_channels(g), channel_arrays, lane_arrays);
    return c;
  }
};

inline Scratch scratch_for(double* base, int tid, int64_t stride) {
  double* p = base + static_cast<int64_t>(tid) * stride;
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
  for (int t = 0; t < kFinalizeTemps; ++t)
    s.temps[t] = p + 7 * kChunkElems + (3 * kChunkElems + 1) / 2 + t * kChunkElems;
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

// Everything one reduce -> finalize -> apply call (or one apply) needs besides its inputs. Either
// every channel's coefficients and shifts in per-channel arrays (the unfused schedule: its
// channels are each more than kFuseBytes / kChunkElems bytes of input, so these, with the
// row-block partials, stay under half the input's size), or per-thread scratch for one chunk at
// a time (`per_chunk`: the fused schedule). Per-thread scratch and task counters besides. One
// allocation.
template <class T, int K>
struct ApplyState {
  bool per_chunk = false;
  Coefs<T, K> coefs;  // per-channel coefficients (origin 0) unless per_chunk
  double* shifts = nullptr;  // per channel, unless per_chunk
  double* partial_a = nullptr;
  double* partial_b = nullptr;
  double* scratch = nullptr;
  int64_t scratch_stride = kScratchDoubles;
  int64_t* again = nullptr;  // per group of chunks: summed once more (reduce_finalize_apply)
  int64_t* claimed = nullptr;  // per group of chunks: tasks claimed so far, to reduce and apply
  int64_t* claimed_chunks = nullptr;  // fused chunks claimed so far
  Geometry g;
  Workspace ws;

  // For a schedule.
  bool allocate(const Plan& p, int threads) {
    const int64_t partials = p.fused ? 0 : p.g.channels * p.num_row_blocks;
    return allocate_with(p.g, p.fused, threads, partials,
                         ceil_div(p.num_chunks, p.chunks_per_group));
  }
  // For an apply alone (apply_everywhere): coefficients per chunk or per channel.
  bool allocate_apply(const Geometry& geometry, int threads, bool by_chunks) {
    return allocate_with(geometry, by_chunks, threads, 0, 0);
  }
  Scratch scratch_of(int tid) const {
    Scratch s = scratch_for(scratch, tid, scratch_stride);
    if (per_chunk) ChunkScratch<T, K>::carve(s.acc_a + kScratchDoubles, s);
    return s;
  }

 private:
  bool allocate_with(const Geometry& geometry, bool by_chunks, int threads, int64_t partials,
                     int64_t groups) {
    using C = Compute<T>;
    g = geometry;
    per_chunk = by_chunks;
    const int64_t channels = per_chunk ? 0 : g.channels;
    const int64_t channel_length = per_chunk ? 0 : Coefs<T, K>::channel_length(g, channels);
    const int64_t lane_length = per_chunk ? 0 : Coefs<T, K>::lane_length(g, channels);
    if (per_chunk) scratch_stride = kScratchDoubles + ChunkScratch<T, K>::doubles(g);
    for (int k = 0; k < K; ++k) ws.reserve<C>(channel_length);
    for (int k = 0; k < K; ++k) ws.reserve<C>(lane_length);
    ws.reserve<double>(channels);
    ws.reserve<double>(partials);
    ws.reserve<double>(partials);
    ws.reserve<double>(threads * scratch_stride);
    ws.reserve<int64_t>(groups);
    ws.reserve<int64_t>(2 * groups + 1);
    if (!ws.allocate()) return false;
    C* channel_arrays[K];
    C* lane_arrays[K];
    for (int k = 0; k < K; ++k) channel_arrays[k] = ws.take<C>(channel_length);
    for (int k = 0; k < K; ++k) lane_arrays[k] = ws.take<C>(lane_length);
    coefs.place(g, channels, channel_arrays, lane_arrays);
    shifts = ws.take<double>(channels);
    partial_a = ws.take<double>(partials);
    partial_b = ws.take<double>(partials);
    scratch = ws.take<double>(threads * scratch_stride);
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
