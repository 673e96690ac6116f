// The BatchNorm kernels. This file is compiled once per instruction set: isa_<name>.cpp defines
// BNC_ISA (a namespace name) and includes it, and the compiler flags of that translation unit decide
// which instructions the vector code below turns into. Everything lives in an anonymous namespace
// inside bnc::BNC_ISA and uses no inline helpers from other headers (no std:: templates), so no
// function compiled for one ISA can be picked by the linker for another.
//
// Shape of the work: every operation is a per-channel reduction (two sums per channel), a tiny
// per-channel finalize (statistics -> coefficients), and a per-element affine map. Both steps walk a
// "plan": the tensor is cut into tasks of (a chunk of channels) x (a block of rows), cut by the
// shape alone. Each task reduces its data in a fixed order and the row-block partials are merged in
// a fixed order, so every result is bitwise identical for any thread count.
//
// Numerics of the statistics: each channel is shifted by a pivot (the mean of its first 8
// elements; the saved mean in backward), and the sums of d = x - pivot and d*d are accumulated in
// double (16 fixed lanes per channel, or one per element of a row; float data in rows first sums 8
// rows in float, see kFloatPartials). The pivot lies within the data's spread, so Q/n - (S/n)^2
// cancels no more than a few digits even when the mean is 1e5 times the standard deviation; a
// pivot that does not (an outlier) is replaced by the mean and the channel summed again. Sums
// cannot overflow for float data. Since all lanes share a channel's pivot, partial sums merge by
// plain (ordered) addition.
//
// Numerics of the apply: y = (x - mean_hi) * scale + (shift - mean_lo * scale), with the mean
// split into two numbers of the compute type (mean_hi + mean_lo = mean to twice their precision):
// x - mean_hi is exact where it matters (x close to a large mean), and the low part of the mean is
// folded into the shift in double. y = alpha * x + beta (PyTorch's form) loses digits there.

#ifndef BNC_ISA
#error "define BNC_ISA before including batch_norm_impl.h"
#endif

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels/batch_norm.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if BNC_HAVE_OPENMP
#include <omp.h>
#endif

namespace bnc {
namespace BNC_ISA {
namespace {

// ---------------------------------------------------------------------------------------------
// Native-width vectors of this translation unit's ISA (16, 32 or 64 bytes). Reductions keep 16
// fixed lanes per channel (kLanes), made of kLanes / kDoublesPerVec vectors, so the order of every
// sum is the same on every ISA; elementwise maps use the native width directly.

#if defined(__AVX512F__)
#define BNC_VEC_BYTES 64
#elif defined(__AVX__)
#define BNC_VEC_BYTES 32
#else
#define BNC_VEC_BYTES 16
#endif

typedef double vd __attribute__((vector_size(BNC_VEC_BYTES)));
typedef float vf __attribute__((vector_size(BNC_VEC_BYTES)));
typedef float vf_for_vd __attribute__((vector_size(BNC_VEC_BYTES / 2)));
typedef _Float16 vh_for_vd __attribute__((vector_size(BNC_VEC_BYTES / 4)));
typedef _Float16 vh_for_vf __attribute__((vector_size(BNC_VEC_BYTES / 2)));

constexpr int64_t kLanes = 16;
constexpr int64_t kDoublesPerVec = BNC_VEC_BYTES / 8;
constexpr int64_t kVecsPerLanes = kLanes / kDoublesPerVec;

template <class T>
struct Types;
template <>
struct Types<float> {
  using Compute = float;      // precision of the elementwise maps
  using Vec = vf;             // a vector of the compute type
  using RawForVd = vf_for_vd;  // kDoublesPerVec elements of T
  using RawForVec = vf;        // the elements of T of one Vec
};
template <>
struct Types<double> {
  using Compute = double;
  using Vec = vd;
  using RawForVd = vd;
  using RawForVec = vd;
};
template <>
struct Types<_Float16> {
  using Compute = float;
  using Vec = vf;
  using RawForVd = vh_for_vd;
  using RawForVec = vh_for_vf;
};

template <class T>
using Compute = typename Types<T>::Compute;
template <class T>
using Vec = typename Types<T>::Vec;
template <class T>
constexpr int64_t kVecElems = sizeof(Vec<T>) / sizeof(Compute<T>);

// Unaligned views of the vector types. Loads and stores go through these typed pointers (not
// memcpy), so the compiler knows float data cannot alias double accumulators and keeps them in
// registers.
template <class V>
struct Unaligned;
#define BNC_UNALIGNED(V, E)                         \
  template <>                                       \
  struct Unaligned<V> {                             \
    typedef V type __attribute__((aligned(alignof(E)))); \
  };
BNC_UNALIGNED(vd, double)
BNC_UNALIGNED(vf, float)
BNC_UNALIGNED(vf_for_vd, float)
BNC_UNALIGNED(vh_for_vd, _Float16)
BNC_UNALIGNED(vh_for_vf, _Float16)
#undef BNC_UNALIGNED

template <class V, class E>
inline V load(const E* p) {
  return *reinterpret_cast<const typename Unaligned<V>::type*>(p);
}

template <class V, class E>
inline void store(E* p, V v) {
  *reinterpret_cast<typename Unaligned<V>::type*>(p) = v;
}

// kDoublesPerVec elements of T, widened to double.
template <class T>
inline vd load_vd(const T* p) {
  return __builtin_convertvector(load<typename Types<T>::RawForVd>(p), vd);
}
#if defined(__x86_64__) && BNC_VEC_BYTES <= 32
// GCC 12 lowers the float -> double __builtin_convertvector through two half-width conversions;
// one instruction does it. (Not for AVX-512: GCC 12's _mm512_cvtps_pd trips
// -Wmaybe-uninitialized in its own header.)
template <>
inline vd load_vd(const float* p) {
#if BNC_VEC_BYTES == 32
  return reinterpret_cast<vd>(_mm256_cvtps_pd(_mm_loadu_ps(p)));
#else
  return reinterpret_cast<vd>(
      _mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i_u*>(p)))));
#endif
}
#endif

// kVecElems<T> elements of T, in the compute type.
template <class T>
inline Vec<T> load_compute(const T* p) {
  return __builtin_convertvector(load<typename Types<T>::RawForVec>(p), Vec<T>);
}

template <class T>
inline void store_compute(T* p, Vec<T> v) {
  store(p, __builtin_convertvector(v, typename Types<T>::RawForVec));
}

template <class V, class S>
inline V broadcast(S s) {
  V v = {};
  return v + s;
}

// {0, 1, 2, ...}: each lane's index, in the element type C.
template <class V, class C>
inline V iota() {
  C lanes[sizeof(V) / sizeof(C)];
  for (size_t l = 0; l < sizeof(V) / sizeof(C); ++l) lanes[l] = static_cast<C>(l);
  return load<V>(lanes);
}

// Sum of 16 lanes in a fixed pairwise order.
inline double lane_sum(const double* lanes) {
  double t[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) t[k] = lanes[k];
  for (int64_t width = kLanes / 2; width >= 1; width /= 2)
    for (int64_t k = 0; k < width; ++k) t[k] += t[k + width];
  return t[0];
}

// Software prefetch of a row piece before it is needed: pieces of one chunk are a row apart
// (often several pages), and hardware prefetchers do not follow such jumps. Long pieces are left
// to the hardware prefetcher.
constexpr int64_t kPrefetchMaxBytes = 16 * 1024;
constexpr int64_t kPrefetchAheadBytes = 32 * 1024;

template <class T>
inline void prefetch_piece(const T* p, int64_t count) {
  const int64_t bytes = count * static_cast<int64_t>(sizeof(T));
  if (bytes > kPrefetchMaxBytes) return;
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool is_finite(double v) { return __builtin_isfinite(v); }

// ---------------------------------------------------------------------------------------------
// The plan: how a tensor is cut into tasks. It depends on the shape and element size only.

// inner below this: a task walks whole row pieces (channels x inner), one accumulator per element
// of the piece ("row family"); at or above it, each (row, channel) segment is long enough to
// vectorize along it with 16 lanes per channel ("segment family").
constexpr int64_t kSegmentMinInner = 64;
// Most accumulator lanes one task keeps (row family), so they stay in L1.
constexpr int64_t kChunkElems = 4096;
// Contiguous bytes a task reads per row at least, so hardware prefetch works; down to
// kMinFusedRunBytes when that makes the chunk small enough to fuse (below), since an unfused chunk
// reads its input twice. Measured at 2 threads (Zen 3), training forward and backward, fused
// against unfused (two to four A/B runs each): ResNet-50 at batch 64 and 128, (64, 1024, 14, 14),
// (64, 512, 28, 28) and (128, 512, 28, 28), runs of 3.1-3.9 KiB: 14-31% faster; (64, 2048, 7,
// 7), row family, 3.9 KiB: 16-18% (one run). Runs of 2 KiB,
// NCL (128, 256, 128) and (128, 512, 64): from 13% faster to 43% slower, not consistent; of
// 1-1.5 KiB, (128, 1024, 14, 14) and (256, 256, 128): 10-45% slower.
constexpr int64_t kMinRunBytes = 4096;
constexpr int64_t kMinFusedRunBytes = 3072;
// A chunk whose whole data is at most this is reduced and applied by one task while in L2 (what
// does not fit there is still in L3). A single channel of up to kLargeFuseBytes is fused too,
// in tensors of kLargeFuseMinChunks such channels or more (to keep many threads busy): measured
// on Zen 3 (512 KiB L2), 10-15% faster on channels of 400 KB (ResNet-50's 32x256x56x56);
// chunks of several smaller channels measured slower at 512 KiB than at 256 KiB.
constexpr int64_t kFuseBytes = 256 * 1024;
constexpr int64_t kLargeFuseBytes = 512 * 1024;
constexpr int64_t kLargeFuseMinChunks = 32;
// Data per task when a chunk is too big to fuse and is cut into row blocks.
constexpr int64_t kTaskBytes = 256 * 1024;
// Rows per task at least, in the row family: a task also costs a few passes over its lanes
// (zeroing the sums, converting the shifts, the finiteness check) and writes a row of double
// partials, all in proportion to the row width; with wide rows and 256 KiB tasks (16 rows of 16
// KiB) that was 20-25% of the reduce. Measured at 2 threads (Zen 3): (1024, 4096) and
// (4096, 1024) training forward 8-15% faster at 128 rows than at 16 and 64. Not below
// kMinBlockRowsTasks row blocks, though (small tensors: threads need tasks).
constexpr int64_t kMinBlockRows = 128;
constexpr int64_t kMinBlockRowsTasks = 8;
constexpr int64_t kMaxRowBlocks = 256;
// Row family: whole rows narrower than kFoldBelowWidth lanes are reduced kFoldRows rows at a
// time (Plan::fold), so that a super-row's lanes fill whole vectors on every ISA (16 floats:
// AVX-512). The fold is the same for every width, so that a channel's sums do not depend on how
// many channels the tensor has (and the same on every ISA).
constexpr int64_t kFoldRows = 16;
constexpr int64_t kFoldBelowWidth = 64;
// Chunks processed together (reduce, then apply) when not fused, so the second sweep hits L3.
constexpr int64_t kGroupBytes = 4 * 1024 * 1024;
// Below this many bytes of input the kernels run on one thread: thread start-up costs more.
// Measured (training forward, AMD Zen 3, 1 vs 2 threads): even at 128 KiB, 1.6x faster on 2
// threads at 512 KiB.
constexpr int64_t kSerialBytes = 128 * 1024;

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
  // taken. Measured at 2 threads (Zen 3), training forward, 16 KiB against 4 KiB pieces:
  // (1024, 4096) 10% faster, (512, 4096) 40%, (256, 16384) 30%, (64, 2048, 7, 7) 15%.
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
  p.num_row_blocks = max64(1, ceil_div(g.outer, p.rows_per_block));
  p.chunks_per_group = max64(1, kGroupBytes / chunk_bytes);
  return p;
}

inline int threads_for(const Plan& p, int64_t elem_bytes, int requested) {
  if (requested < 1) requested = 1;
  if (p.g.size() * elem_bytes < kSerialBytes) return 1;
  const int64_t tasks = p.fused ? p.num_chunks : p.num_tasks();
  return static_cast<int>(min64(requested, max64(tasks, 1)));
}

// Runs body(thread_id, num_threads) on a team of `threads`; the body may contain barriers.
template <class Body>
inline void run_team(int threads, Body& body) {
#if BNC_HAVE_OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    body(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  (void)threads;
  body(0, 1);
}

// A barrier of the team running the body; none for a team of one (run_team then opens no
// parallel region, and an orphaned barrier would bind to a caller's enclosing region).
inline void team_barrier(int nth) {
#if BNC_HAVE_OPENMP
  if (nth > 1) {
#pragma omp barrier
  }
#endif
  (void)nth;
}

// Tasks [begin, end) of `count` for thread `tid` of `nth`: a contiguous static split.
inline void split_range(int64_t count, int tid, int nth, int64_t& begin, int64_t& end) {
  begin = count * tid / nth;
  end = count * (tid + 1) / nth;
}

// ---------------------------------------------------------------------------------------------
// Reduction terms: the two per-element quantities summed per channel, given the channel's shift.
// vec/one work in double (float64 data, and the segment family); vec_f/one_f in float, for the
// row family's float partial sums of float32 and float16 data (see kFloatPartials).

// Forward statistics: d = x - pivot; sums of d and d*d.
template <class T>
struct MomentTerms {
  const T* x;
  void prefetch(int64_t off, int64_t count) const { prefetch_piece(x + off, count); }
  void vec(int64_t off, vd shift, vd& a, vd& b) const {
    const vd d = load_vd(x + off) - shift;
    a += d;
    b += d * d;
  }
  void one(int64_t off, double shift, double& a, double& b) const {
    const double d = static_cast<double>(x[off]) - shift;
    a += d;
    b += d * d;
  }
  void vec_f(int64_t off, vf shift, vf& a, vf& b) const {
    const vf d = load_compute(x + off) - shift;
    a += d;
    b += d * d;
  }
  void one_f(int64_t off, float shift, float& a, float& b) const {
    const float d = static_cast<float>(x[off]) - shift;
    a += d;
    b += d * d;
  }
};

// Backward statistics: sums of dy and dy * (x - mean).
template <class T>
struct GradTerms {
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
    const double g = static_cast<double>(dy[off]);
    a += g;
    b += g * (static_cast<double>(x[off]) - mean);
  }
  void vec_f(int64_t off, vf mean, vf& a, vf& b) const {
    const vf g = load_compute(dy + off);
    a += g;
    b += g * (load_compute(x + off) - mean);
  }
  void one_f(int64_t off, float mean, float& a, float& b) const {
    const float g = static_cast<float>(dy[off]);
    a += g;
    b += g * (static_cast<float>(x[off]) - mean);
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

// Per-thread scratch: accumulators and expanded per-lane coefficients for one task.
struct Scratch {
  double* acc_a;     // kChunkElems lanes (row family) or 16 per channel (segment family)
  double* acc_b;
  double* shift;     // kChunkElems
  double* chunk_a;   // per channel of the chunk (fused path)
  double* chunk_b;
  float* part_a;     // kChunkElems each: float partial sums and shifts (row family)
  float* part_b;
  float* part_shift;
};
// Five arrays of kChunkElems doubles, three of kChunkElems floats.
constexpr int64_t kScratchDoubles = 5 * kChunkElems + (3 * kChunkElems + 1) / 2;

inline Scratch scratch_for(double* base, int tid) {
  double* p = base + static_cast<int64_t>(tid) * kScratchDoubles;
  Scratch s;
  s.acc_a = p;
  s.acc_b = p + kChunkElems;
  s.shift = p + 2 * kChunkElems;
  s.chunk_a = p + 3 * kChunkElems;
  s.chunk_b = p + 4 * kChunkElems;
  s.part_a = reinterpret_cast<float*>(p + 5 * kChunkElems);
  s.part_b = s.part_a + kChunkElems;
  s.part_shift = s.part_b + kChunkElems;
  return s;
}

// One chunk's piece of every row, as the row family's reduce sees it: lane j is element
// base + j of each row; acc_a/acc_b hold one double accumulator per lane.
struct RowPiece {
  int64_t base, row_stride, width;
  int64_t end;  // elements in the tensor (prefetches stay below)
  const double* lane_shift;
  double* acc_a;
  double* acc_b;
};

// The row family reads rows in one of two orders (the sums are the same bits either way):
//  - in order: each row front to back, then the next. The memory system sees one sequential
//    stream, prefetched kInOrderPrefetchBytes ahead. The per-lane sums live in L1 scratch, so
//    rows must be short. Measured 1.3-1.5x faster than blocked on tensors in DRAM (Zen 3).
//  - blocked: kPartialRows rows side by side, a cache line of each at a time, sums in
//    registers. Fewer loads and stores per element: faster when the data comes from cache, and
//    for long rows. Pieces of rows (chunk narrower than the row) are a row apart, which hardware
//    prefetchers do not follow: those are prefetched kPrefetchAheadBytes ahead.
constexpr int64_t kInOrderMaxRowBytes = 2048;
constexpr int64_t kInOrderPrefetchBytes = 4096;
// Rows of a block: float partial sums are taken over blocks of this many rows (counted from the
// task's first row), and the blocked order visits this many rows at once.
constexpr int64_t kPartialRows = 8;

// Float data (float32, float16): each lane's two terms are first summed in float over a block
// of kPartialRows rows, and the block's sums are then added to the lane's double accumulators.
// Widening every element to double costs twice the arithmetic. An 8-term float sum is off by a
// few float ulps of its magnitude, and these errors are independent from block to block; the
// variance Q/n - (S/n)^2 magnifies them by about 1 + k^2 for a pivot k standard deviations from
// the mean, which is why the forward pivot is the mean of a few elements (k ~ 0.3) and an
// outlier pivot is replaced (kRepivotStds). Shifts are exact in float (a float mean of a few
// elements, or a float saved mean). A lane whose float sums overflowed (|terms| > 4e37) or hold a
// NaN or an infinity is summed again over its task in double (reduce_task); a channel whose
// squares fall below float's range, likewise (channel_sums_in_double).
template <class Terms>
constexpr bool kFloatPartials = sizeof(Compute<TermsElem<Terms>>) == 4;

// Outputs of at least this many bytes are written with non-temporal stores (set from the L3
// cache size in dispatch.cpp): they would not stay in cache for the next layer anyway. The same
// size tells the reduce that its input comes from memory rather than cache.
inline bool streaming_output(const Geometry& g, int64_t elem_bytes) {
  return g.size() * elem_bytes >= stream_threshold_bytes();
}

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
template <class Terms>
void reduce_rows_blocked(const Terms& terms, const RowPiece& q, int64_t o0, int64_t o1,
                         const Scratch& s, bool prefetch) {
  using T = TermsElem<Terms>;
  constexpr bool kFloat = kFloatPartials<Terms>;
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

// The channels [c0, c1) and rows [o0, o1) of task (chunk, row_block).
struct TaskBounds {
  int64_t c0, c1, o0, o1;
  TaskBounds(const Plan& p, int64_t chunk, int64_t row_block)
      : c0(chunk * p.chunk_channels),
        c1(min64(p.g.channels, c0 + p.chunk_channels)),
        o0(row_block * p.rows_per_block),
        o1(min64(p.g.outer, o0 + p.rows_per_block)) {}
};

// The segment family's reduce, in three steps so that a chunk's rows can be reduced a few at a
// time (apply_reducing_next): zero the 16 lanes of each of `channels` channels; add rows
// [o0, o1) of channels [c0, c1) to them (the next row prefetched if `prefetch`); sum each
// channel's lanes to out_a/out_b.
inline void zero_segment_lanes(const Scratch& s, int64_t channels) {
  for (int64_t j = 0; j < channels * kLanes; ++j) s.acc_a[j] = s.acc_b[j] = 0.0;
}

template <class Terms>
void reduce_segment_rows(const Geometry& g, const Terms& terms, const double* shifts, int64_t c0,
                         int64_t c1, int64_t o0, int64_t o1, bool prefetch, const Scratch& s) {
  const int64_t vec_inner = g.inner - g.inner % kLanes;
  for (int64_t o = o0; o < o1; ++o) {
    if (prefetch && o + 1 < o1)
      terms.prefetch(((o + 1) * g.channels + c0) * g.inner, (c1 - c0) * g.inner);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t seg = (o * g.channels + c) * g.inner;
      const double shift = shifts[c];
      const vd sh = broadcast<vd>(shift);
      double* lanes_a = s.acc_a + (c - c0) * kLanes;
      double* lanes_b = s.acc_b + (c - c0) * kLanes;
      vd a[kVecsPerLanes], b[kVecsPerLanes];
      for (int64_t k = 0; k < kVecsPerLanes; ++k) {
        a[k] = load<vd>(lanes_a + k * kDoublesPerVec);
        b[k] = load<vd>(lanes_b + k * kDoublesPerVec);
      }
      for (int64_t i = 0; i < vec_inner; i += kLanes)
        for (int64_t k = 0; k < kVecsPerLanes; ++k)
          terms.vec(seg + i + k * kDoublesPerVec, sh, a[k], b[k]);
      for (int64_t k = 0; k < kVecsPerLanes; ++k) {
        store(lanes_a + k * kDoublesPerVec, a[k]);
        store(lanes_b + k * kDoublesPerVec, b[k]);
      }
      for (int64_t i = vec_inner; i < g.inner; ++i)
        terms.one(seg + i, shift, lanes_a[i - vec_inner], lanes_b[i - vec_inner]);
    }
  }
}

inline void segment_sums(const Scratch& s, int64_t channels, double* out_a, double* out_b) {
  for (int64_t c = 0; c < channels; ++c) {
    out_a[c] = lane_sum(s.acc_a + c * kLanes);
    out_b[c] = lane_sum(s.acc_b + c * kLanes);
  }
}

// Reduces task (chunk, row_block): writes the chunk's per-channel sums to out_a/out_b.
template <class Terms>
void reduce_task(const Plan& p, const Terms& terms, const double* shifts, int64_t chunk,
                 int64_t row_block, const Scratch& s, double* out_a, double* out_b) {
  using T = TermsElem<Terms>;
  const Geometry& g = p.g;
  const auto [c0, c1, o0, o1] = TaskBounds(p, chunk, row_block);
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
    const double* lane_shift = shifts + c0;
    if (!direct) {
      for (int64_t j = 0; j < lanes; ++j) s.shift[j] = shifts[c0 + j % width / g.inner];
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
    const bool in_order = p.num_chunks == 1 &&
                          lanes * static_cast<int64_t>(sizeof(T)) <= kInOrderMaxRowBytes &&
                          streaming_output(g, sizeof(T));
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
    if (kFloatPartials<Terms> && !lanes_finite(piece)) {
      // Some lane's float partial sums overflowed (|terms| > 4e37), or its data hold a NaN or an
      // infinity: that lane is summed again over the task's rows in double (they are in cache).
      // Lane by lane, so that no other lane's result depends on it.
      for (int64_t j = 0; j < lanes; ++j) {
        if (is_finite(acc_a[j]) && is_finite(acc_b[j])) continue;
        double a = 0.0, b = 0.0;
        const int64_t rows = r1 - r0 + (j < tail_width ? 1 : 0);
        for (int64_t o = r0; o < r0 + rows; ++o)
          terms.one(o * piece.row_stride + piece.base + j, lane_shift[j], a, b);
        acc_a[j] = a;
        acc_b[j] = b;
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
  reduce_segment_rows(g, terms, shifts, c0, c1, o0, o1, true, s);
  segment_sums(s, c1 - c0, out_a, out_b);
}

// ---------------------------------------------------------------------------------------------
// Apply maps: the output value from the inputs and per-channel coefficients, in the compute type.

// Forward: y = (x - mean_hi) * scale + shift_lo, shift_lo = shift - mean_lo * scale (see
// set_normalize).
template <class T>
struct NormalizeMap {
  using C = Compute<T>;
  static constexpr int kCoefs = 3;  // mean_hi, scale, shift_lo
  static constexpr int kInputs = 1;
  const T* x;
  T* out;
  void prefetch(int64_t off, int64_t count) const { prefetch_piece(x + off, count); }
  Vec<T> vec(int64_t off, const Vec<T>* k) const {
    return (load_compute(x + off) - k[0]) * k[1] + k[2];
  }
  C one(int64_t off, const C* k) const { return (static_cast<C>(x[off]) - k[0]) * k[1] + k[2]; }
};

// Channel c's coefficients of NormalizeMap for y = (x - mean) * scale + shift.
template <class C>
inline void set_normalize(C* const* k, int64_t c, double mean, double scale, double shift) {
  const C mean_hi = static_cast<C>(mean);
  k[0][c] = mean_hi;
  k[1][c] = static_cast<C>(scale);
  k[2][c] = static_cast<C>(shift - (mean - static_cast<double>(mean_hi)) * scale);
}

// Backward, training: dx = a * dy + b * (x - mean) + k. The mean is the saved mean, a number of
// the compute type (float for float32 and float16 data), so x - mean is exact where it matters.
template <class T>
struct GradTrainMap {
  using C = Compute<T>;
  static constexpr int kCoefs = 4;  // a, mean, b, k
  static constexpr int kInputs = 2;
  const T* dy;
  const T* x;
  T* out;
  void prefetch(int64_t off, int64_t count) const {
    prefetch_piece(dy + off, count);
    prefetch_piece(x + off, count);
  }
  Vec<T> vec(int64_t off, const Vec<T>* k) const {
    return k[0] * load_compute(dy + off) + k[2] * (load_compute(x + off) - k[1]) + k[3];
  }
  C one(int64_t off, const C* k) const {
    return k[0] * static_cast<C>(dy[off]) + k[2] * (static_cast<C>(x[off]) - k[1]) + k[3];
  }
};

// Backward, inference: dx = a * dy (the statistics are constants).
template <class T>
struct GradEvalMap {
  using C = Compute<T>;
  static constexpr int kCoefs = 1;
  static constexpr int kInputs = 1;
  const T* dy;
  T* out;
  void prefetch(int64_t off, int64_t count) const { prefetch_piece(dy + off, count); }
  Vec<T> vec(int64_t off, const Vec<T>* k) const { return k[0] * load_compute(dy + off); }
  C one(int64_t off, const C* k) const { return k[0] * static_cast<C>(dy[off]); }
};

// Non-temporal stores write an output that is too large to stay in cache straight to memory,
// without first reading its cache lines (a third of the traffic of a streaming map).
template <class V, class E>
inline void stream_store(E* p, V v) {
#if defined(__x86_64__)
  if constexpr (sizeof(V) == 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), reinterpret_cast<__m512i&>(v));
  } else if constexpr (sizeof(V) == 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i&>(v));
  } else if constexpr (sizeof(V) == 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), reinterpret_cast<__m128i&>(v));
  } else {
    store(p, v);
  }
#else
  store(p, v);
#endif
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

template <bool Stream, class T>
inline void put(T* p, Vec<T> v) {
  const auto raw = __builtin_convertvector(v, typename Types<T>::RawForVec);
  if constexpr (Stream) {
    stream_store(p, raw);
  } else {
    store(p, raw);
  }
}

// Channels whose segments are shorter than this get per-lane coefficients (below).
constexpr int64_t kPeriodicBelowInner = 16;

// Per-lane coefficients for inner < kPeriodicBelowInner: lane j of a row (channels * inner
// elements) holds channel j / inner's coefficient, and the arrays run kVecElems past the row,
// repeating it, so a vector starting anywhere in a row reads the right coefficients even where
// it crosses into the next row. Then the map is one flat loop with no per-row bookkeeping.
template <class T, int K>
struct LaneCoefs {
  Compute<T>* lanes[K];
  int64_t width = 0;  // 0: not used (inner >= kPeriodicBelowInner)
  int64_t inner = 1;
  static int64_t length(const Geometry& g) {
    return g.inner < kPeriodicBelowInner ? g.channels * g.inner + kVecElems<T> : 0;
  }
  // Copies channel c's coefficients to its lanes.
  void spread(int64_t c, Compute<T>* const* coefs) const {
    if (!width) return;
    for (int64_t i = 0; i < inner; ++i)
      for (int64_t lane = c * inner + i; lane < width + kVecElems<T>; lane += width)
        for (int k = 0; k < K; ++k) lanes[k][lane] = coefs[k][c];
  }
};

// Inputs that come from memory are prefetched this far ahead of the vector being written, since
// hardware prefetch alone keeps too few lines in flight for a loop that does arithmetic between
// its loads and stores. Measured on Zen 3 (2 threads, avx2 path, in the benchmark's conditions):
// inference on 8 MB and more (as large as the stream threshold: too large for the cache) 4-24%
// faster; 8 and 16 KiB ahead no better. Inputs in cache only pay for the prefetches: inference
// on 1-4 MB 9-20% slower with them. Likewise the second sweep of training forward and backward
// expects its inputs still in L2 (fused chunks) or L3 (the reverse sweep): prefetching there cost
// up to 25% when they were in L3, and gained 5-11% on channels-last tensors of 51-103 MB, so it
// is done only when they cannot all be (second_sweep_from_memory), or for the tasks read longest
// ago (evicted_from_l3).
constexpr int64_t kApplyPrefetchBytes = 4096;

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
void apply_range(const Geometry& g, const Map& map, Compute<T>* const* coefs,
                 const LaneCoefs<T, Map::kCoefs>& lanes, int64_t e, int64_t end,
                 ApplyPrefetch prefetch) {
  using C = Compute<T>;
  using V = Vec<T>;
  constexpr int K = Map::kCoefs;
  constexpr int64_t W = kVecElems<T>;
  constexpr uintptr_t kAlign = sizeof(typename Types<T>::RawForVec);
  if (e >= end) return;  // also keeps empty tensors (inner == 0) away from the divisions below
  T* const out = map.out;
  const int64_t ahead = prefetch.ahead;
  const int64_t prefetch_end = prefetch.end;
  auto aligned = [&](int64_t at) {
    return !Stream || reinterpret_cast<uintptr_t>(out + at) % kAlign == 0;
  };
  if (!lanes.width) {
    // Segments of one channel (inner >= 16 >= W, so a vector crosses at most one segment end):
    // coefficients broadcast per segment, and a vector that crosses into the next segment blends
    // both channels' coefficients. The loop stays on aligned vectors across segment ends, so
    // streaming stores always write whole vectors. Channel and segment end are tracked
    // incrementally (no division per segment).
    int64_t c = (e / g.inner) % g.channels;
    int64_t segment_end = (e / g.inner + 1) * g.inner;
    C ks[K];
    V kv[K];
    auto set_channel = [&](int64_t channel) {
      for (int k = 0; k < K; ++k) {
        ks[k] = coefs[k][channel];
        kv[k] = broadcast<V>(ks[k]);
      }
    };
    auto advance = [&]() {
      c = c + 1 == g.channels ? 0 : c + 1;
      segment_end += g.inner;
      set_channel(c);
    };
    set_channel(c);
    for (; e < end && !aligned(e); ++e) {
      if (e == segment_end) advance();
      out[e] = static_cast<T>(map.one(e, ks));
    }
    const V lane_index = iota<V, C>();
    for (; e + W <= end; e += W) {
      if (e < prefetch_end) map.prefetch(e + ahead, W);
      if (e == segment_end) advance();
      if (e + W <= segment_end) {
        put<Stream>(out + e, map.vec(e, kv));
        continue;
      }
      // Lanes below segment_end - e belong to channel c, the others to the next channel.
      const auto in_this = lane_index < static_cast<C>(segment_end - e);
      V mixed[K];
      const int64_t next = c + 1 == g.channels ? 0 : c + 1;
      for (int k = 0; k < K; ++k) mixed[k] = in_this ? kv[k] : broadcast<V>(coefs[k][next]);
      put<Stream>(out + e, map.vec(e, mixed));
      advance();
    }
    for (; e < end; ++e) {
      if (e == segment_end) advance();
      out[e] = static_cast<T>(map.one(e, ks));
    }
    return;
  }
  // Locals, not the struct's fields: stores through `out` could alias those for the compiler.
  const C* lane_coef[K];
  for (int k = 0; k < K; ++k) lane_coef[k] = lanes.lanes[k];
  const int64_t width = lanes.width;
  int64_t j = e % width;  // lane of element e
  auto one = [&]() {
    C ks[K];
    for (int k = 0; k < K; ++k) ks[k] = lane_coef[k][j];
    out[e] = static_cast<T>(map.one(e, ks));
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
// inputs of the task the thread reduces next, the same rows of chunk + next_chunks, so that its
// reads from memory overlap this task's writes instead of following them (otherwise a thread
// reads, then writes, where a copy does both at once). Measured on Zen 3 (2 threads, avx2 path,
// in the benchmark's conditions), on inputs of at least the stream threshold:
//  - fused chunks (next chunk; four A/B runs): training forward 3-14% and backward 4-22% faster
//    on ResNet-50's NCHW shapes of 13-103 MB; the 8 MiB NCL case, at the threshold, from 2%
//    faster to 5% slower in training forward. The segment family now reduces the next chunk
//    while it writes this one instead (apply_reducing_next); the row family still does this;
//  - groups of channels larger than L2 (the next group's task; two A/B runs): ResNet-50's
//    (16 to 64, 64, 112, 112) and (64, 256, 56, 56), 51-206 MB, training forward 13-22% and
//    backward 0-9% faster. In the row family it was not: (256, 16384) and (512, 16384) 0-18%
//    slower, (128, 2048, 7, 7) 4-14% faster; so only the segment family does it.
enum class TaskPrefetch { none, ahead, next_chunk };

// Applies `map` on task (chunk, row_block): a contiguous range when chunks are whole rows, else
// one piece per row, the next piece prefetched.
template <bool Stream, class T, class Map>
void apply_task(const Plan& p, const Map& map, Compute<T>* const* coefs,
                const LaneCoefs<T, Map::kCoefs>& lanes, int64_t chunk, int64_t row_block,
                TaskPrefetch prefetch, int64_t next_chunks = 1) {
  const Geometry& g = p.g;
  const auto [c0, c1, o0, o1] = TaskBounds(p, chunk, row_block);
  const int64_t row = g.channels * g.inner;
  auto fetch_for = [&](int64_t begin, int64_t end) {
    if (prefetch == TaskPrefetch::ahead) return ApplyPrefetch::within<T>(end);
    if (prefetch == TaskPrefetch::next_chunk && chunk + next_chunks < p.num_chunks) {
      // Row piece [begin, end) of this chunk; that of the next task's chunk in the same row
      // starts next_chunks * chunk_channels * inner elements later, and may be narrower (the
      // last chunk).
      const int64_t next_c0 = c0 + next_chunks * p.chunk_channels;
      const int64_t next_c1 = min64(g.channels, next_c0 + p.chunk_channels);
      return ApplyPrefetch{next_chunks * p.chunk_channels * g.inner,
                           begin + (next_c1 - next_c0) * g.inner};
    }
    return ApplyPrefetch{};
  };
  if (p.num_chunks == 1) {
    apply_range<Stream, T>(g, map, coefs, lanes, o0 * row, o1 * row, fetch_for(o0 * row, o1 * row));
    return;
  }
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t piece = (o * g.channels + c0) * g.inner;
    const int64_t piece_end = piece + (c1 - c0) * g.inner;
    if (o + 1 < o1) map.prefetch(piece + row, (c1 - c0) * g.inner);
    apply_range<Stream, T>(g, map, coefs, lanes, piece, piece_end, fetch_for(piece, piece_end));
  }
}

// Fused chunks of the segment family whose input comes from memory: writes `chunk` a row at a
// time and, after each row, reduces the same row of `next` (its sums to s.chunk_a/chunk_b), whose
// inputs the row's apply prefetches. A thread then reads, writes and computes at once, where
// reduce_task followed by apply_task computes while the memory is idle and then moves data.
// Same sums, same order: the rows of `next` are added in order, as reduce_task adds them.
// Measured against that (Zen 3, 2 threads, avx2 path, three in-process A/B runs), ResNet-50's
// NCHW shapes at batch 32 and 64 and NCL (64, 256, 128): training forward from 1.5% slower to
// 11% faster (14 of 15 faster), backward from 2% slower to 14% faster (13 of 15). Prefetching
// a row further ahead: no better; alternating a channel's segment at a time: 5-400% slower.
template <bool Stream, class T, class Terms, class Map>
void apply_reducing_next(const Plan& p, const Terms& terms, const double* shifts, const Map& map,
                         Compute<T>* const* coefs, const LaneCoefs<T, Map::kCoefs>& lanes,
                         int64_t chunk, int64_t next, const Scratch& s) {
  const Geometry& g = p.g;
  const TaskBounds now(p, chunk, 0), later(p, next, 0);
  const int64_t width = (now.c1 - now.c0) * g.inner;
  const int64_t next_width = (later.c1 - later.c0) * g.inner;
  const int64_t offset = (later.c0 - now.c0) * g.inner;  // from a row's piece of chunk to next's
  zero_segment_lanes(s, later.c1 - later.c0);
  for (int64_t o = 0; o < g.outer; ++o) {
    const int64_t piece = (o * g.channels + now.c0) * g.inner;
    apply_range<Stream, T>(g, map, coefs, lanes, piece, piece + width,
                           ApplyPrefetch{offset, piece + next_width});
    reduce_segment_rows(g, terms, shifts, later.c0, later.c1, o, o + 1, false, s);
  }
  segment_sums(s, later.c1 - later.c0, s.chunk_a, s.chunk_b);
}

// ---------------------------------------------------------------------------------------------
// Workspace: one malloc per call (no C++ allocation, no exceptions in parallel regions).

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


// Whether the second sweep (unfused) must read its inputs from memory: a group of chunks of every
// input tensor is as large as L3 or larger, so its first-read part is gone by the time it is
// applied (L3 also holds everything else). At exactly L3 (32 MiB here), measured on Zen 3 (2
// threads, three A/B runs): (32768, 256) training forward 4-7% faster with the prefetch, and the
// backward of (4096, 1024) and (1024, 4096) (two 16 MiB inputs) 5-12%.
inline bool second_sweep_from_memory(const Plan& p, int64_t elem_bytes, int inputs) {
  if (p.fused) return false;
  const int64_t group_channels = min64(p.chunks_per_group * p.chunk_channels, p.g.channels);
  return group_channels * p.g.outer * p.g.inner * elem_bytes * inputs >= l3_bytes();
}

// A smaller group is still partly gone from L3 when it is written: the reverse sweep meets the
// tasks reduced first last, after every thread has read (reduce) and read again (apply) all the
// later tasks, and L3 is shared with everything else on the machine. A task whose inputs were
// read that long ago (later tasks' inputs, twice, at least 1/kEvictedL3Fraction of L3) is
// prefetched too. Measured on Zen 3 (2 threads, avx2 path, two in-process A/B runs interleaved
// with a copy and PyTorch), training forward: (1024, 4096) 1-8% faster, (6272, 1024) 3-4%,
// (100352, 64) 5-6%, (4096, 1024) from 0.5% slower to 7% faster; backward within 2% either way
// but one case 5% faster. Prefetching every task instead: from 4% slower to 15% faster.
constexpr int64_t kEvictedL3Fraction = 4;

inline bool evicted_from_l3(int64_t later_tasks, int64_t task_input_bytes) {
  return 2 * later_tasks * task_input_bytes >= l3_bytes() / kEvictedL3Fraction;
}

// The reduce -> finalize -> apply driver shared by forward training and backward.
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
  const int64_t task_input_bytes = p.rows_per_block * p.chunk_channels * g.inner *
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
      // next one meanwhile, and no thread waits for one slowed by its neighbours on the machine
      // (a chunk's results do not depend on which thread computes it). With a fixed split, the
      // two threads' times differed by up to 30% (Zen 3, 2 threads). Measured against it
      // (two in-process A/B runs): ResNet-50 NCHW shapes, NCL (64, 256, 128) and
      // (64, 1024, 14, 14), training forward 1-17% faster, backward from 5% slower to 15% faster.
      auto claim = [&]() { return __atomic_fetch_add(st.claimed_chunks, 1, __ATOMIC_RELAXED); };
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
        reduced = pipelined && next < p.num_chunks;
        if (reduced) {
          apply_reducing_next<Stream, T>(p, terms, st.shifts, map, st.coefs, st.lanes, chunk, next,
                                         s);
          continue;
        }
        // An input too large for the cache (Stream) comes from memory: the next chunk is
        // fetched while this one is written.
        apply_task<Stream, T>(p, map, st.coefs, st.lanes, chunk, 0,
                              Stream && next < p.num_chunks ? TaskPrefetch::next_chunk
                                                            : TaskPrefetch::none,
                              next - chunk);
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
      // Row family: each thread claims its next task when it is done with the last one, so a
      // thread slowed by its neighbours on the machine does not hold the others up at the
      // barrier (a task's sums go to its own partials: the results do not depend on who
      // reduces it). Measured against a fixed split (Zen 3, 2 threads, two in-process A/B
      // runs), (N, C) and channels-last shapes of 8-32 MB: training forward from 2% slower to 8%
      // faster (12 of 15 faster), backward from 2% slower to 5% faster. The segment family keeps
      // a fixed split: its next-group prefetch fetches the inputs of the thread's own next task.
      const bool claim = p.row_family;
      int64_t* const claimed = st.claimed + 2 * (first / p.chunks_per_group);
      auto reduce_group = [&](bool first_time) {
        if (claim && first_time) {
          for (int64_t t; (t = __atomic_fetch_add(&claimed[0], 1, __ATOMIC_RELAXED)) < tasks;)
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
        for (int64_t k; (k = __atomic_fetch_add(&claimed[1], 1, __ATOMIC_RELAXED)) < tasks;)
          apply_one(tasks - 1 - k, k);
      } else {
        for (int64_t t = end - 1; t >= begin; --t) apply_one(t, nth * (end - 1 - t));
      }
      if (Stream) stream_fence();
      // No barrier here: the next group touches other channels' partials and coefficients only,
      // and the parallel region's end joins the last group.
    }
  };
  run_team(threads, body);
}

// ---------------------------------------------------------------------------------------------
// Entry points.

// Float partial sums lose squares below float's range (|x - pivot| < 1e-19). A channel whose mean
// square deviation is below kTinySquares (but that is not constant: then both sums are exactly 0)
// is summed again in double, element by element in memory order: serial and strided, but only
// for such channels (a spread of 1e-15 or less), which otherwise get a wrong variance when eps is
// tiny too.
constexpr double kTinySquares = 0x1p-100;

template <class Terms>
void channel_sums_in_double(const Terms& terms, const Geometry& g, int64_t c, double shift,
                            double& sum_a, double& sum_b) {
  double a = 0.0, b = 0.0;
  for (int64_t o = 0; o < g.outer; ++o) {
    const int64_t segment = (o * g.channels + c) * g.inner;
    for (int64_t i = 0; i < g.inner; ++i) terms.one(segment + i, shift, a, b);
  }
  sum_a = a;
  sum_b = b;
}

// A pivot k standard deviations from its channel's mean makes Q/n - (S/n)^2 cancel about
// 2 log10(k) digits (and scales the rounding of float partial sums by k^2): beyond kRepivotStds
// the channel is summed again around its mean. The pivot is the mean of the first
// kPivotSamples elements: for independent samples it lies 4 standard deviations out with a
// probability of ~1e-29 (z = 4 * sqrt(8)), so only data whose first elements are padding,
// outliers or a drift get the second pass. Measured (float32, row family, first 8 elements k
// std out): variance error 1.5e-7 at k = 3, 3.6e-7 at 5, 7.9e-7 at 7.9 before the second pass.
constexpr double kRepivotStds = 4.0;
constexpr int64_t kPivotSamples = 8;

template <class T, class P>
int64_t forward_train(const T* x, T* y, Geometry g, const P* weight, const P* bias, double eps,
                      double momentum, P* running_mean, P* running_var, P* save_mean,
                      P* save_invstd, int num_threads) {
  using C = Compute<T>;
  const Plan p = make_plan(g, sizeof(T));
  const int threads = threads_for(p, sizeof(T), num_threads);
  ApplyState<T, NormalizeMap<T>::kCoefs> st;
  if (!st.allocate(p, threads, 3)) return -1;
  double* mean = st.ws.template take<double>(g.channels);
  double* var = st.ws.template take<double>(g.channels);
  double* invstd = st.ws.template take<double>(g.channels);

  // The pivot of each channel: the mean of its first kPivotSamples elements, a number of the
  // compute type (so that float partial sums hold it exactly). A single element can lie a few
  // standard deviations from the mean, and the rounding of float partial sums grows with the
  // square of that distance; the mean of 8 typically lies a third of one away.
  // Sample k of every channel is element (k / inner, k % inner) of it: read row by row.
  const int64_t samples = min64(kPivotSamples, g.per_channel());
  for (int64_t c = 0; c < g.channels; ++c) st.shifts[c] = 0.0;
  for (int64_t k = 0; k < samples; ++k) {
    const T* sample = x + (k / g.inner) * g.channels * g.inner + k % g.inner;
    if (g.inner == 1) {  // a row: contiguous, so the loop vectorizes
      for (int64_t c = 0; c < g.channels; ++c) st.shifts[c] += static_cast<double>(sample[c]);
    } else {
      for (int64_t c = 0; c < g.channels; ++c)
        st.shifts[c] += static_cast<double>(sample[c * g.inner]);
    }
  }
  for (int64_t c = 0; c < g.channels; ++c)
    st.shifts[c] = samples ? static_cast<double>(static_cast<C>(st.shifts[c] / samples)) : 0.0;
  const double n = static_cast<double>(g.per_channel());
  C* const* coefs = st.coefs;
  const MomentTerms<T> terms{x};
  auto finalize = [&](int64_t c0, int64_t c1, const double* sums_d, const double* sums_dd,
                      bool last) {
    bool final_sums = true;
    for (int64_t c = c0; c < c1; ++c) {
      double sum_d = sums_d[c - c0], sum_dd = sums_dd[c - c0];
      if (kFloatPartials<MomentTerms<T>> && p.row_family && sum_dd < kTinySquares * n &&
          !(sum_dd == 0.0 && sum_d == 0.0))
        channel_sums_in_double(terms, g, c, st.shifts[c], sum_d, sum_dd);
      const double mean_offset = sum_d / n;
      double v = sum_dd / n - mean_offset * mean_offset;
      if (!last && mean_offset * mean_offset > kRepivotStds * kRepivotStds * v) {
        // The pivot is an outlier: sum the channel again around its mean (a number of the
        // compute type, so float partial sums stay exact in their shift).
        st.shifts[c] = static_cast<double>(static_cast<C>(st.shifts[c] + mean_offset));
        final_sums = false;
        continue;
      }
      if (v < 0.0) v = 0.0;  // rounding only; NaN passes through
      mean[c] = st.shifts[c] + mean_offset;
      var[c] = v;
    }
    if (!final_sums) return false;
    // Square roots and divisions, the slowest instructions here, in a loop of their own: it
    // vectorizes.
    for (int64_t c = c0; c < c1; ++c) invstd[c] = 1.0 / __builtin_sqrt(var[c] + eps);
    for (int64_t c = c0; c < c1; ++c) {
      save_mean[c] = static_cast<P>(mean[c]);
      save_invstd[c] = static_cast<P>(invstd[c]);
      set_normalize(coefs, c, mean[c],
                    weight ? invstd[c] * static_cast<double>(weight[c]) : invstd[c],
                    bias ? static_cast<double>(bias[c]) : 0.0);
    }
    return true;
  };
  const NormalizeMap<T> map{x, y};
  if (streaming_output(g, sizeof(T)))
    reduce_finalize_apply<true, T>(p, terms, finalize, map, st, threads);
  else
    reduce_finalize_apply<false, T>(p, terms, finalize, map, st, threads);

  int64_t skipped = 0;
  const double unbias = n / (n - 1.0);
  for (int64_t c = 0; c < g.channels; ++c) {
    if (!is_finite(mean[c]) || !is_finite(var[c])) {
      ++skipped;
      continue;
    }
    if (running_mean)
      running_mean[c] = static_cast<P>((1.0 - momentum) * static_cast<double>(running_mean[c]) +
                                       momentum * mean[c]);
    if (running_var)
      running_var[c] = static_cast<P>((1.0 - momentum) * static_cast<double>(running_var[c]) +
                                      momentum * var[c] * unbias);
  }
  return skipped;
}

// Applies `map` to the whole tensor, one contiguous range per thread in memory order (no
// reduction to stay close to), boundaries on multiples of 64 elements. set_coefs(c, coefs) fills
// channel c's coefficients, coefs[k][c].
template <class T, class Map, class SetCoefs>
int64_t apply_everywhere(const Geometry& g, const Map& map, SetCoefs&& set_coefs, int num_threads) {
  const Plan p = make_plan(g, sizeof(T));
  // One thread per kSerialBytes of work at most (and none below it).
  const int64_t work_threads = max64(1, g.size() * static_cast<int64_t>(sizeof(T)) / kSerialBytes);
  const int threads = static_cast<int>(min64(max64(num_threads, 1), work_threads));
  ApplyState<T, Map::kCoefs> st;
  if (!st.allocate(p, 0, 0)) return -1;
  for (int64_t c = 0; c < g.channels; ++c) {
    set_coefs(c, st.coefs);
    st.lanes.spread(c, st.coefs);
  }
  const bool stream = streaming_output(g, sizeof(T));
  const int64_t total = g.size();
  auto body = [&](int tid, int nth) {
    const int64_t begin = total / 64 * tid / nth * 64;
    const int64_t end = tid + 1 == nth ? total : total / 64 * (tid + 1) / nth * 64;
    if (stream) {  // too large for the cache: the input comes from memory too
      apply_range<true, T>(g, map, st.coefs, st.lanes, begin, end, ApplyPrefetch::within<T>(end));
      stream_fence();
    } else {
      apply_range<false, T>(g, map, st.coefs, st.lanes, begin, end, ApplyPrefetch{});
    }
  };
  run_team(threads, body);
  return 0;
}

// Inference: y = x * scale + (shift - mean * scale), PyTorch's form, costs a third of the
// arithmetic of the split-mean form and is as accurate (errors of a few float ulps of
// |weight| * (|y| + 2 * kAffineMaxMeanOverStd)) while |mean| * invstd is small; with any channel
// far from zero the split-mean form is used.
constexpr double kAffineMaxMeanOverStd = 4.0;

template <class T>
struct AffineMap {
  using C = Compute<T>;
  static constexpr int kCoefs = 2;  // scale, offset
  const T* x;
  T* out;
  void prefetch(int64_t off, int64_t count) const { prefetch_piece(x + off, count); }
  Vec<T> vec(int64_t off, const Vec<T>* k) const { return load_compute(x + off) * k[0] + k[1]; }
  C one(int64_t off, const C* k) const { return static_cast<C>(x[off]) * k[0] + k[1]; }
};

template <class T, class P>
int64_t forward_eval(const T* x, T* y, Geometry g, const P* weight, const P* bias,
                     const P* running_mean, const P* running_var, double eps, P* save_mean,
                     P* save_invstd, int num_threads) {
  using C = Compute<T>;
  bool affine = true;
  for (int64_t c = 0; c < g.channels; ++c) {
    const double m = static_cast<double>(running_mean[c]);
    const double invstd = 1.0 / __builtin_sqrt(static_cast<double>(running_var[c]) + eps);
    save_mean[c] = running_mean[c];
    save_invstd[c] = static_cast<P>(invstd);
    affine = affine && __builtin_fabs(m) * invstd <= kAffineMaxMeanOverStd;  // false for NaN
  }
  auto scale_of = [&](int64_t c) {
    const double invstd = static_cast<double>(save_invstd[c]);
    return weight ? invstd * static_cast<double>(weight[c]) : invstd;
  };
  auto shift_of = [&](int64_t c) { return bias ? static_cast<double>(bias[c]) : 0.0; };
  if (affine) {
    return apply_everywhere<T>(g, AffineMap<T>{x, y}, [&](int64_t c, C* const* k) {
      const double scale = scale_of(c);
      k[0][c] = static_cast<C>(scale);
      k[1][c] = static_cast<C>(shift_of(c) - static_cast<double>(running_mean[c]) * scale);
    }, num_threads);
  }
  return apply_everywhere<T>(g, NormalizeMap<T>{x, y}, [&](int64_t c, C* const* k) {
    set_normalize(k, c, static_cast<double>(running_mean[c]), scale_of(c), shift_of(c));
  }, num_threads);
}

template <class T, class P, class Map>
int64_t backward_with(const Map& map, const T* dy, const T* x, Geometry g, const P* save_mean,
                      const P* save_invstd, const P* weight, P* grad_weight, P* grad_bias,
                      int num_threads) {
  using C = Compute<T>;
  const Plan p = make_plan(g, sizeof(T));
  const int threads = threads_for(p, sizeof(T), num_threads);
  ApplyState<T, Map::kCoefs> st;
  if (!st.allocate(p, threads, 0)) return -1;
  // The shift of each channel is the saved mean: sums of dy and dy * (x - mean).
  for (int64_t c = 0; c < g.channels; ++c) st.shifts[c] = static_cast<double>(save_mean[c]);
  const double n = static_cast<double>(g.per_channel());
  C* const* coefs = st.coefs;
  const GradTerms<T> terms{dy, x};
  auto finalize = [&](int64_t c0, int64_t c1, const double* sums_dy, const double* sums_dy_xmu,
                      bool /*last*/) {
    for (int64_t c = c0; c < c1; ++c) {
      const double sum_dy = sums_dy[c - c0], sum_dy_xmu = sums_dy_xmu[c - c0];
      const double invstd = static_cast<double>(save_invstd[c]);
      const double a = weight ? invstd * static_cast<double>(weight[c]) : invstd;
      grad_bias[c] = static_cast<P>(sum_dy);
      grad_weight[c] = static_cast<P>(sum_dy_xmu * invstd);
      coefs[0][c] = static_cast<C>(a);
      if constexpr (Map::kCoefs == 4) {
        coefs[1][c] = static_cast<C>(st.shifts[c]);  // exact: the saved mean is a P <= C number
        coefs[2][c] = static_cast<C>(-a * invstd * invstd * sum_dy_xmu / n);
        coefs[3][c] = static_cast<C>(-a * sum_dy / n);
      }
    }
    return true;  // the shift is the saved mean: no outlier pivot to move away from
  };
  if (streaming_output(g, sizeof(T)))
    reduce_finalize_apply<true, T>(p, terms, finalize, map, st, threads);
  else
    reduce_finalize_apply<false, T>(p, terms, finalize, map, st, threads);
  return 0;
}

template <class T, class P>
int64_t backward(const T* dy, const T* x, T* dx, Geometry g, const P* save_mean,
                 const P* save_invstd, const P* weight, bool training, P* grad_weight,
                 P* grad_bias, int num_threads) {
  if (training)
    return backward_with(GradTrainMap<T>{dy, x, dx}, dy, x, g, save_mean, save_invstd, weight,
                         grad_weight, grad_bias, num_threads);
  return backward_with(GradEvalMap<T>{dy, dx}, dy, x, g, save_mean, save_invstd, weight,
                       grad_weight, grad_bias, num_threads);
}

}  // namespace

#define BNC_STR2(s) #s
#define BNC_STR(s) BNC_STR2(s)

const KernelTable& table() {
  static const KernelTable t = {
      BNC_STR(BNC_ISA),
      {forward_train<float, float>, forward_eval<float, float>, backward<float, float>},
      {forward_train<double, double>, forward_eval<double, double>, backward<double, double>},
      {forward_train<_Float16, float>, forward_eval<_Float16, float>, backward<_Float16, float>},
  };
  return t;
}

}  // namespace BNC_ISA
}  // namespace bnc
