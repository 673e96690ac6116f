// The thread team: a parallel region (or none for one thread), barriers, static splits and
// dynamic task claims. The only file that speaks OpenMP.
#pragma once

#include <cstdint>

#if BNC_HAVE_OPENMP
#include <omp.h>
#endif

namespace bnc {
namespace BNC_ISA {
namespace {

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


// The next index of a shared counter: threads claim tasks as they go, so that one slowed by its
// neighbours on the machine does not hold the others up (a task's results do not depend on who
// computes it).
inline int64_t claim_next(int64_t* counter) {
  return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
}

}  // namespace
}  // namespace BNC_ISA
}  // namespace bnc
