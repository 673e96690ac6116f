"""Concurrent calls from Python threads (the kernels release the GIL and each call starts its own
OpenMP team), also while another thread changes the thread count."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from helpers import F16, F32, F64, assert_bitwise, make_inputs, run_everything

import bnc


def test_num_threads_roundtrip(restore_num_threads):
    for n in (1, 2, 3, 7, 1):
        bnc.set_num_threads(n)
        assert bnc.get_num_threads() == n
        assert bnc.config()["num_threads"] == n
    assert isinstance(bnc.get_num_threads(), int)


def test_concurrent_calls_from_python_threads():
    """The kernels release the GIL: concurrent calls from several Python threads (each starting
    its own OpenMP team) give the same results as sequential calls."""
    cases = [((64, 32, 14, 14), 1, np.float32), ((5000, 40), 1, np.float64),
             ((16, 14, 14, 64), -1, np.float32), ((8, 3, 100), 1, np.float64)] * 3

    def run(i):
        shape, axis, dtype = cases[i]
        x, dy, w, b, rm, rv = make_inputs(shape, axis, dtype, seed=i)
        y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv, axis=axis)
        dx, gw, gb = bnc.batch_norm_backward(dy, x, m, s, w, axis=axis)
        ye, _, _ = bnc.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis)
        return y, m, s, rm, rv, dx, gw, gb, ye

    sequential = [run(i) for i in range(len(cases))]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, range(len(cases))))
    for i, (a, b) in enumerate(zip(sequential, concurrent)):
        for u, v in zip(a, b):
            assert np.array_equal(u, v), f"case {i} differs when run concurrently"


CONCURRENT_CASES = [
    ((16, 32, 16, 16), 1, F32),  # 512 KB: multi-threaded kernels
    ((2000, 24), 1, F64),
    ((8, 14, 14, 32), -1, F32),
    ((4, 3, 5), 1, F64),  # serial
    ((6, 11, 11, 33), -1, F16),
    ((4, 7, 70), 1, F32),
    ((30000, 3), 1, F32),
    ((2, 64, 30, 30), 1, F64),
]


def test_concurrent_python_threads_while_thread_count_changes(restore_num_threads):
    """8 Python threads, each 20 times forward/backward (train and eval) on its own data, while
    another thread keeps changing bnc.set_num_threads(1..4): every result is bitwise equal to the
    single-threaded one computed beforehand."""
    data = [make_inputs(shape, axis, dtype, seed=60 + i, offset=1.5)
            for i, (shape, axis, dtype) in enumerate(CONCURRENT_CASES)]

    def run(i):
        x, dy, w, b, rm, rv = data[i]
        return run_everything(x, dy, w, b, rm, rv, CONCURRENT_CASES[i][1])

    bnc.set_num_threads(1)
    expected = [run(i) for i in range(len(CONCURRENT_CASES))]
    stop = threading.Event()
    changes = [0]

    def churn():
        k = 0
        while not stop.is_set():
            bnc.set_num_threads(1 + k % 4)
            k += 1
            changes[0] = k

    def worker(i):
        for rep in range(20):
            assert_bitwise(run(i), expected[i], f"python thread {i}, repetition {rep}")
        return i

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            assert sorted(pool.map(worker, range(8))) == list(range(8))
    finally:
        stop.set()
        churner.join()
    assert changes[0] > 10, "the thread count was hardly changed during the run"
