"""The output pool: a dropped output's memory serves the next output of its size, never while any
array, view or tensor still uses it; bounded; switchable; thread-safe."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import bnc
import bnc.torch as bt
from bnc._pool import MIN_BYTES, POOL

SHAPE = (64, 32, 32, 16)  # 4 MiB of float32


@pytest.fixture
def pool_limit():
    before = bnc.get_output_pool_bytes()
    yield
    bnc.set_output_pool_bytes(before)


def _address(a):
    return a.__array_interface__["data"][0]


def test_a_dropped_output_serves_the_next_one(pool_limit):
    bnc.set_output_pool_bytes(1 << 30)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    y, _, _ = bnc.batch_norm_forward(x)
    first = _address(y)
    assert _address(y) % 64 == 0
    del y
    y2, _, _ = bnc.batch_norm_forward(x)
    assert _address(y2) == first
    dx, _, _ = bnc.batch_norm_backward(x, x, np.zeros(SHAPE[1], np.float32),
                                       np.ones(SHAPE[1], np.float32))
    assert _address(dx) != first  # y2 still holds it


def test_a_view_keeps_the_memory(pool_limit):
    bnc.set_output_pool_bytes(1 << 30)
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    y, _, _ = bnc.batch_norm_forward(x)
    view = y[3:, ::2]
    want = view.copy()
    first = _address(y)
    del y
    gc.collect()
    others = [bnc.batch_norm_forward(x + i)[0] for i in range(3)]
    assert all(_address(o) != first for o in others)
    np.testing.assert_array_equal(view, want)
    del view
    again, _, _ = bnc.batch_norm_forward(x)
    assert _address(again) == first


def test_torch_outputs_and_their_views(pool_limit):
    bnc.set_output_pool_bytes(1 << 30)
    x = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last).requires_grad_()
    m = bt.BatchNorm2d(SHAPE[1])
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    keep = y.detach()[:, :4]  # a torch view of y's storage
    want = keep.clone()
    y.sum().backward()
    address = y.data_ptr()
    del y
    for _ in range(3):
        z = m(x.detach())
        assert z.data_ptr() != address
        del z
    torch.testing.assert_close(keep, want, rtol=0, atol=0)
    del keep
    gc.collect()
    assert m(x.detach()).data_ptr() == address


def test_limit_and_switch_off(pool_limit):
    bnc.set_output_pool_bytes(6 << 20)  # room for one 4 MiB block
    arrays = [POOL.empty((1 << 20,), np.float32) for _ in range(3)]
    del arrays
    assert POOL.held_bytes() == 4 << 20
    bnc.set_output_pool_bytes(0)
    assert POOL.held_bytes() == 0
    a = POOL.empty((1 << 20,), np.float32)
    del a
    assert POOL.held_bytes() == 0
    small = POOL.empty((MIN_BYTES // 8,), np.float32)  # below MIN_BYTES: plain np.empty
    assert small.base is None
    for bad, error in ((-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="n: expected"):
            bnc.set_output_pool_bytes(bad)


def test_threads_never_share_a_block(pool_limit):
    bnc.set_output_pool_bytes(64 << 20)
    errors = []

    def work(seed):
        try:
            for i in range(50):
                a = POOL.empty((1 << 20,), np.float32)  # 4 MiB
                a.fill(seed * 1000 + i)
                b = POOL.empty((1 << 20,), np.float32)
                b.fill(-1)
                if not (a == seed * 1000 + i).all():
                    errors.append(seed)
                del a, b
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


_STACK_STEPS = """
import resource
import numpy as np
from bnc import bench_stack
x0 = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
train, _ = bench_stack._bnc_stack(x0, np.ones_like(x0), 1, False, 1024)
for _ in range(3):
    train()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    train()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def test_a_stack_of_layers_faults_no_pages_in_steady_state():
    # python -m bnc bench stack's training step on 1 MiB layers (outputs kept on the way up, freed
    # in reverse on the way down), in a fresh process: with those outputs from glibc it trims its
    # heap in this pattern and every output faults its pages in again (~1550 minor faults a step
    # measured); from the pool, none.
    run = subprocess.run([sys.executable, "-c", _STACK_STEPS], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "BNC_OUTPUT_POOL_BYTES": str(1 << 30)})
    assert run.returncode == 0, run.stderr
    faults = float(run.stdout.strip().splitlines()[-1])
    assert faults < 64, f"{faults} minor page faults a step"
