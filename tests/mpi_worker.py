"""One process of the MPI tests (tests/test_sync_mpi.py runs it under ``mpiexec -n N``).

Every case checks itself on every rank; a failure prints the traceback and aborts the whole job
(MPI_Abort), so that no rank is left waiting in a collective. Prints "OK <case>" on success.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np
from mpi4py import MPI

import bnc

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def split_rows(total, size):
    """Uneven batches: rank r gets r + 1 shares; with 3 ranks, rank 1 gets none."""
    shares = [r + 1 for r in range(size)]
    if size == 3:
        shares[1] = 0
    bounds = np.cumsum([0] + [total * s // sum(shares) for s in shares])
    bounds[-1] = total
    return [(int(bounds[r]), int(bounds[r + 1])) for r in range(size)]


def case_exact(dtype, shape, axis, momentum):
    rng = np.random.default_rng(7)
    full = (5 + 3 * rng.standard_normal(shape)).astype(dtype)
    dy_full = rng.standard_normal(shape).astype(dtype)
    lo, hi = split_rows(shape[0], SIZE)[RANK]
    x, dy = full[lo:hi], dy_full[lo:hi]
    cls = {2: bnc.BatchNorm1d, 3: bnc.BatchNorm1d, 4: bnc.BatchNorm2d, 5: bnc.BatchNorm3d}
    c = shape[axis]
    single = cls[len(shape)](c, momentum=momentum, axis=axis, dtype=dtype)
    sync = bnc.SyncBatchNorm(c, momentum=momentum, axis=axis, dtype=dtype)
    for m in (single, sync):
        m.weight[:] = np.linspace(0.5, 1.5, c)
        m.bias[:] = np.linspace(-1, 1, c)
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    for step in range(2):
        y_full = single(full)
        y = sync(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        np.testing.assert_allclose(y, y_full[lo:hi], rtol=rtol, atol=rtol)
        dx_full = single.backward(dy_full)
        dx = sync.backward(dy)
        np.testing.assert_allclose(dx, dx_full[lo:hi], rtol=rtol, atol=rtol)
        grads = COMM.allgather((sync.grad_weight, sync.grad_bias))
        np.testing.assert_allclose(sum(g[0] for g in grads), single.grad_weight, rtol=rtol,
                                   atol=rtol * np.abs(single.grad_weight).max())
        np.testing.assert_allclose(sum(g[1] for g in grads), single.grad_bias, rtol=rtol,
                                   atol=rtol * np.abs(single.grad_bias).max())
        for name in ("running_mean", "running_var"):
            np.testing.assert_allclose(getattr(sync, name), getattr(single, name), rtol=rtol)
            everyone = COMM.allgather(getattr(sync, name).tobytes())
            assert all(b == everyone[0] for b in everyone), f"{name} differs between ranks"
        assert sync.num_batches_tracked == single.num_batches_tracked
    sync.eval()
    single.eval()
    np.testing.assert_allclose(sync(x), single(full)[lo:hi], rtol=rtol, atol=rtol)


def expect_error(fn, match):
    try:
        fn()
    except ValueError as error:
        assert match in str(error), f"message: {error}"
        return str(error)
    raise AssertionError(f"no ValueError (expected {match!r})")


def case_misuse():
    # one value per channel over all processes: the same ValueError on every rank
    x = np.ones((1 if RANK == 0 else 0, 3), np.float32)
    message = expect_error(lambda: bnc.SyncBatchNorm(3)(x), "Expected more than 1 value")
    assert all(m == message for m in COMM.allgather(message))
    # disagreeing channel counts, dtypes, phases: every rank raises, naming it
    c = 4 if RANK == 0 else 5
    expect_error(lambda: bnc.SyncBatchNorm(c)(np.ones((4, c), np.float32)),
                 "disagree on channels (rank 0: 4, rank 1: 5")
    dtype = np.float32 if RANK == 0 else np.float64
    expect_error(lambda: bnc.SyncBatchNorm(3, dtype=dtype)(np.ones((4, 3), dtype)),
                 "disagree on dtype")
    m = bnc.SyncBatchNorm(3)
    x = np.random.default_rng(RANK).standard_normal((4, 3)).astype(np.float32)
    m(x)
    if RANK == 0:  # a forward on rank 0 meets the others' backward
        expect_error(lambda: m(x), "disagree on phase (rank 0: forward, rank 1: backward")
    else:
        expect_error(lambda: m.backward(x), "disagree on phase (rank 0: forward, rank 1: backward")


def case_subcommunicator():
    sub = COMM.Split(RANK % 2, RANK)
    x = np.random.default_rng(RANK).standard_normal((6, 3))
    m = bnc.SyncBatchNorm(3, dtype=np.float64, comm=sub)
    m(x)
    members = sub.allgather(x)
    full = np.concatenate(members)
    np.testing.assert_allclose(m.running_mean, 0.1 * full.mean(0), rtol=1e-12)


CASES = {
    "exact": lambda: [case_exact(*args) for args in [
        (np.float64, (12, 5), 1, 0.1), (np.float32, (9, 6, 7), 1, None),
        (np.float64, (10, 4, 3, 5), -1, 0.3), (np.float32, (8, 3, 2, 3, 4), 1, 0.1)]],
    "misuse": case_misuse,
    "subcommunicator": case_subcommunicator,
}

if __name__ == "__main__":
    name = sys.argv[1]
    try:
        CASES[name]()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        COMM.Abort(1)
    COMM.Barrier()
    print(f"OK {name} rank {RANK}", flush=True)
