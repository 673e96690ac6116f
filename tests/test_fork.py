"""Fork: a child forked after the parent ran bnc on 2+ threads computes correct results (libgomp's
thread pool does not survive fork, so the child's kernels run on one thread until it sets a
thread count), with os.fork() and with a multiprocessing Pool of the fork start method.

Every child is waited for with a timeout and killed if it hangs: a regression fails, never hangs.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import select
import signal
import threading
import time
import traceback

import numpy as np
import pytest
from helpers import F32, assert_bitwise, make_inputs, run_everything

import bnc
from bnc import _core

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)"),
    # Python >= 3.12 warns on any fork of a multi-threaded process; forking one is the point here.
    pytest.mark.filterwarnings(
        "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"
    ),
]

CHILD_TIMEOUT_S = 60.0
# 2 MiB of float32: well over the 128 KiB under which a call runs on one thread.
SHAPE = (512, 1024)


def parent_results(seed=0):
    """Inputs and every output of a (2-thread, in the parent) forward/backward, train and eval."""
    x, dy, w, b, rm, rv = make_inputs(SHAPE, 1, F32, seed=seed)
    return (x, dy, w, b, rm, rv), run_everything(x, dy, w, b, rm, rv, 1)


def run_in_forked_child(work, timeout=CHILD_TIMEOUT_S):
    """Runs ``work()`` in a child made by ``os.fork()`` and returns what it returned (pickled back
    through a pipe). Fails the test if the child raised, or has not finished after ``timeout``
    seconds (then it is killed)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_fd)
            try:
                message = ("ok", work())
            except BaseException:
                message = ("error", traceback.format_exc())
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(pickle.dumps(message))
        finally:
            os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the forked child hung: no answer after {timeout:.0f} s (killed)")
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
    assert data, "the child exited without an answer"
    kind, value = pickle.loads(data)
    assert kind == "ok", f"in the forked child:\n{value}"
    return value


def test_fork_child_after_multithreaded_call_computes_bitwise_results(restore_num_threads):
    bnc.set_num_threads(2)
    inputs, want = parent_results()
    src = np.arange(1 << 18, dtype=np.float64)

    def child():
        got = run_everything(*inputs, 1)
        assert_bitwise(got, want, "forked child vs. parent (2 threads)")
        dst = np.empty_like(src)
        _core.copy(src, dst)
        assert np.array_equal(dst, src)
        return bnc.get_num_threads()

    assert run_in_forked_child(child) == 1
    # The parent is unaffected: still 2 threads, still the same bits.
    assert bnc.get_num_threads() == 2
    assert_bitwise(run_everything(*inputs, 1), want, "parent after the fork")


def test_fork_child_reports_one_thread_until_it_sets_a_count(restore_num_threads):
    bnc.set_num_threads(2)
    parent_results()

    def child():
        seen = [bnc.get_num_threads(), bnc.config()["num_threads"]]
        bnc.set_num_threads(3)  # the child's own choice is reported as is (no kernel runs here)
        seen += [bnc.get_num_threads(), bnc.config()["num_threads"]]
        bnc.set_num_threads(1)
        seen += [bnc.get_num_threads(), bnc.config()["num_threads"]]
        return seen

    assert run_in_forked_child(child) == [1, 1, 3, 3, 1, 1]


def test_fork_child_of_a_parent_on_the_default_count(restore_num_threads):
    """Without set_num_threads in the parent (OpenMP's default count) the child also runs on one
    thread, and a grandchild forked from it too."""
    inputs, want = parent_results(seed=1)

    def grandchild():
        assert_bitwise(run_everything(*inputs, 1), want, "grandchild")
        return bnc.config()["num_threads"]

    def child():
        assert_bitwise(run_everything(*inputs, 1), want, "child")
        return bnc.config()["num_threads"], run_in_forked_child(grandchild)

    assert run_in_forked_child(child) == (1, 1)


def test_fork_while_another_thread_is_inside_a_kernel(restore_num_threads):
    """A fork while another Python thread of the parent runs a 2-thread kernel: the child holds a
    copy of that call's half-done state, which nothing in it touches again."""
    bnc.set_num_threads(2)
    inputs, want = parent_results(seed=2)
    big = make_inputs((64, 64, 64, 16), 1, F32, seed=3)  # 16 MiB: each call takes a while
    stop = threading.Event()
    calls = [0]

    def busy():
        while not stop.is_set():
            run_everything(*big, 1)
            calls[0] += 1

    def child():
        assert_bitwise(run_everything(*inputs, 1), want, "child forked mid-kernel")
        return bnc.get_num_threads()

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        for _ in range(3):
            time.sleep(0.02)
            assert run_in_forked_child(child) == 1
    finally:
        stop.set()
        worker.join(timeout=CHILD_TIMEOUT_S)
    assert not worker.is_alive()
    assert calls[0] >= 1


def test_multiprocessing_fork_pool_after_multithreaded_call(restore_num_threads):
    bnc.set_num_threads(2)
    xs = [make_inputs(SHAPE, 1, F32, seed=10 + i)[:2] for i in range(4)]
    want = [bnc.batch_norm_forward(x) for x, _ in xs]
    want_back = [bnc.batch_norm_backward(dy, x, m, s) for (x, dy), (_, m, s) in zip(xs, want)]

    pool = multiprocessing.get_context("fork").Pool(2)
    try:
        # bnc's own functions are mapped: they pickle by reference, unlike this test module's.
        got = pool.map_async(bnc.batch_norm_forward, [x for x, _ in xs]).get(CHILD_TIMEOUT_S)
        got_back = pool.starmap_async(
            bnc.batch_norm_backward, [(dy, x, m, s) for (x, dy), (_, m, s) in zip(xs, want)]
        ).get(CHILD_TIMEOUT_S)
        threads = pool.apply_async(bnc.get_num_threads).get(CHILD_TIMEOUT_S)
    except multiprocessing.TimeoutError:
        pytest.fail(f"a fork-started Pool worker hung: no result after {CHILD_TIMEOUT_S:.0f} s")
    finally:
        pool.terminate()
        pool.join()
    assert threads == 1
    for i, (g, w) in enumerate(zip(got + got_back, want + want_back)):
        keys = ("out", "a", "b")
        assert_bitwise(dict(zip(keys, g)), dict(zip(keys, w)), f"Pool result {i}")
