// The kernels' tuning constants, in two groups. What each one controls and what was measured to
// choose it (shapes, CPU, threads) is in docs/tuning.md, one entry per constant.
#pragma once

#include <cstdint>

namespace bnc {
namespace BNC_ISA {
namespace {

// ---------------------------------------------------------------------------------------------
// Changes the bits: these shape the plan (how a tensor is cut into tasks, hence the order of
// every sum) or the arithmetic. Changing one moves the golden digests (tests/test_golden.py).

// Fixed accumulator lanes per channel in the segment family, the same on every ISA.
constexpr int64_t kLanes = 16;
// inner below this: row family (vectorize across a row); at or above: segment family.
constexpr int64_t kSegmentMinInner = 64;
// Most accumulator lanes one row-family task keeps, so they stay in L1.
constexpr int64_t kChunkElems = 4096;
// Contiguous bytes a task reads per row at least (hardware prefetch), and the shorter runs
// accepted when they make a chunk small enough to fuse.
constexpr int64_t kMinRunBytes = 4096;
constexpr int64_t kMinFusedRunBytes = 3072;
// A chunk of at most kFuseBytes is reduced and applied while in L2; single channels up to
// kLargeFuseBytes are fused too in tensors of at least kLargeFuseMinChunks such channels.
constexpr int64_t kFuseBytes = 256 * 1024;
constexpr int64_t kLargeFuseBytes = 512 * 1024;
constexpr int64_t kLargeFuseMinChunks = 32;
// Data per task when a chunk is too big to fuse and is cut into row blocks.
constexpr int64_t kTaskBytes = 256 * 1024;
// Row family: rows per task at least (a task's per-lane overhead is proportional to the row
// width), but at least kMinBlockRowsTasks row blocks; never more than kMaxRowBlocks.
constexpr int64_t kMinBlockRows = 128;
constexpr int64_t kMinBlockRowsTasks = 8;
constexpr int64_t kMaxRowBlocks = 256;

// The ReLU backward keeps y > 0 as bits between its reduce and its apply for tensors of up to 8x
// this many elements (backward_relu_bits): 16 MiB of bits for 128 Mi elements (512 MB of float32).
constexpr int64_t kMaxReluBitsBytes = 16 << 20;
// Whole rows narrower than kFoldBelowWidth lanes are reduced kFoldRows rows at a time, so that
// a super-row fills whole vectors on every ISA.
constexpr int64_t kFoldRows = 16;
constexpr int64_t kFoldBelowWidth = 64;
// Float data: per-lane float partial sums over blocks of this many rows before adding to double.
constexpr int64_t kPartialRows = 8;
// Channels whose mean square deviation is below this are summed again in double (float partial
// sums lose squares below float's range).
constexpr double kTinySquares = 0x1p-100;
// A pivot further than this many standard deviations from the mean: the channel is summed again.
constexpr double kRepivotStds = 4.0;
// The pivot is the mean of a channel's first kPivotSamples elements.
constexpr int64_t kPivotSamples = 8;
// float64 channels whose sums overflow (|x| beyond ~1e152) are summed again with every term
// scaled by this power of two.
constexpr double kOverflowScale = 0x1p-600;
// Inference uses y = alpha * x + beta while |mean| * invstd <= this for every channel, else the
// split-mean form.
constexpr double kAffineMaxMeanOverStd = 4.0;

// ---------------------------------------------------------------------------------------------
// Speed only: results do not depend on these (tests/test_reproducibility.py checks it for the
// thread count and streaming).

// Row pieces up to kPrefetchMaxBytes are prefetched kPrefetchAheadBytes ahead (hardware
// prefetchers do not follow the jumps between them).
constexpr int64_t kPrefetchMaxBytes = 16 * 1024;
constexpr int64_t kPrefetchAheadBytes = 32 * 1024;
// Chunks processed together when not fused, so that the second sweep hits L3.
constexpr int64_t kGroupBytes = 4 * 1024 * 1024;
// Below this many bytes of input the kernels run on one thread.
constexpr int64_t kSerialBytes = 128 * 1024;
// Row family, one chunk, rows up to this and input from memory: read rows in order (one
// sequential stream, prefetched kInOrderPrefetchBytes ahead) instead of blocked.
constexpr int64_t kInOrderMaxRowBytes = 2048;
constexpr int64_t kInOrderPrefetchBytes = 4096;
// The same for the terms of two or three inputs (the backward's), from cache too, rows of more
// than kInOrderMaxRowBytes and up to this.
constexpr int64_t kInOrderManyInputsMaxRowBytes = 4096;
// Segments shorter than this get per-lane coefficients (a flat loop with no per-row bookkeeping).
constexpr int64_t kPeriodicBelowInner = 16;
// Segments shorter than this run their whole vectors in a loop of their own (apply_range).
constexpr int64_t kShortSegmentElems = 64;
// Apply loops prefetch inputs that come from memory this far ahead.
constexpr int64_t kApplyPrefetchBytes = 4096;
// The reverse sweep prefetches a task whose inputs were read this fraction of L3 ago or longer.
constexpr int64_t kEvictedL3Fraction = 4;
// An apply alone (inference forward, elemt, backward_elemt) streams its output only from this
// many times the stream threshold on (3/4 of L3 by default): it reads its input once, so an output
// up to there stays in cache for the next layer (docs/tuning.md).
constexpr int64_t kApplyStreamFactor = 3;

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
