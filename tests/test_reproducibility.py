"""Bitwise reproducibility: every output is the same

- with non-temporal (streaming) stores as with plain ones, into out= at any element offset;
- for every thread count (more threads than cores and than tasks too) and on repeated runs;
- on every ISA path (no FP contraction, fixed 16-lane reduction order).

tests/test_golden.py pins the bits themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import F16, F32, F64, assert_bitwise, case_id, make_inputs, run_everything

import bnc
from bnc import _core

# -- streaming (non-temporal) stores ---------------------------------------------------------------


STREAM_SHAPES = [
    ((3, 5), 1),
    ((7, 37, 7, 7), 1),  # row family, odd
    ((5, 3, 13, 17), 1),  # inner 221: segment family with a tail
    ((4, 19, 70), 1),  # inner 70: segments just over one 64-element vector run
    ((6, 11, 11, 33), -1),  # channels-last, odd C
    ((2, 64, 30, 30), 1),  # several chunks
    ((1, 3, 1000), 1),  # a single row
    ((33, 5), 1),
    ((9, 3, 17), 1),  # inner 17: broadcast coefficients, vectors crossing segment ends
]


def _out_maker(offset):
    """out= buffers that are C-contiguous, element-aligned and start ``offset`` elements into a
    fresh (64-byte aligned by NumPy) buffer: misaligned relative to any vector width unless
    offset is 0. Filled with NaN so an element that is not written is seen."""
    def make(like):
        flat = np.full(like.size + offset, np.nan, like.dtype)
        out = flat[offset:].reshape(like.shape)
        assert out.flags.c_contiguous and out.flags.aligned and out.flags.writeable
        return out
    return make


@pytest.mark.parametrize("dtype", [F16, F32, F64], ids=case_id)
@pytest.mark.parametrize("shape,axis", STREAM_SHAPES, ids=case_id)
def test_streaming_stores_are_bitwise_identical(shape, axis, dtype, stream_threshold):
    x, dy, w, b, rm, rv = make_inputs(shape, axis, dtype, seed=sum(shape), offset=1.5)
    assert x.nbytes < stream_threshold, "precondition: the default path must not stream here"
    for offset in (0, 1, 3, 5):
        make_out = _out_maker(offset)
        _core._set_stream_threshold_bytes(-1)
        plain = run_everything(x, dy, w, b, rm, rv, axis, make_out)
        plain_alloc = run_everything(x, dy, w, b, rm, rv, axis)
        assert_bitwise(plain_alloc, plain, f"out offset {offset} vs allocated")
        _core._set_stream_threshold_bytes(0)
        assert _core.stream_threshold_bytes() == 0
        streamed = run_everything(x, dy, w, b, rm, rv, axis, make_out)
        streamed_alloc = run_everything(x, dy, w, b, rm, rv, axis)
        _core._set_stream_threshold_bytes(-1)
        for key, value in streamed.items():
            assert not np.isnan(value).any(), f"{key}: not every element was written (streaming)"
        assert_bitwise(streamed, plain, f"streaming vs default, out offset {offset}")
        assert_bitwise(streamed_alloc, plain, "streaming (allocated out) vs default")


def test_large_tensor_streaming_and_not_are_bitwise_identical(stream_threshold,
                                                              restore_num_threads):
    """A 16 MB tensor written with streaming stores (threshold 0) and with plain stores
    (threshold 2**62), whatever the default is on this machine."""
    x, dy, w, b, rm, rv = make_inputs((16, 256, 32, 32), 1, F32, seed=7, offset=1.5)
    bnc.set_num_threads(2)
    _core._set_stream_threshold_bytes(2 ** 62)
    plain = run_everything(x, dy, w, b, rm, rv, 1)
    _core._set_stream_threshold_bytes(0)
    streamed = run_everything(x, dy, w, b, rm, rv, 1)
    assert_bitwise(streamed, plain, "32 MB tensor, streaming vs plain stores")


def test_copy_with_streaming_stores_is_exact(stream_threshold):
    """bnc._core.copy (the benchmark's yardstick) with every size streamed: odd sizes, and
    source/destination starting at every offset within a 16-byte vector. Sizes past 4 KiB + 64
    bytes per thread reach the loop that prefetches the source 4 KiB ahead."""
    rng = np.random.default_rng(5)
    src_buf = rng.integers(0, 256, 100_100, dtype=np.uint8)
    _core._set_stream_threshold_bytes(0)
    for size in (0, 1, 7, 15, 16, 17, 63, 64, 65, 127, 129, 1000, 4099, 4160, 4177, 8257, 20011,
                 100_003):
        for so in (0, 1, 5, 15):
            for do in (0, 1, 3, 8, 15):
                dst_buf = np.zeros(size + 32, np.uint8)
                src = src_buf[so:so + size]
                dst = dst_buf[do:do + size]
                _core.copy(src, dst)
                np.testing.assert_array_equal(dst, src, err_msg=f"size {size} src+{so} dst+{do}")
                assert not dst_buf[:do].any() and not dst_buf[do + size:].any(), (
                    f"copy wrote outside dst (size {size}, dst offset {do})")


# -- thread counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,axis,dtype",
    [
        ((64, 256, 32, 32), 1, np.float32),  # large: many tasks, channel blocks and row blocks
        ((40000, 3), 1, np.float32),  # (N, C): row blocks merged in order
        ((200000, 8), 1, np.float64),
        ((96, 3, 28, 28), 1, np.float64),  # a channel bigger than one cached block
        ((32, 14, 14, 64), -1, np.float32),  # channels-last
        ((16, 37, 7, 7), 1, np.float32),
        ((8, 5, 13), 1, np.float64),  # small: runs serially
    ],
    ids=lambda v: ("x".join(map(str, v)) if isinstance(v, tuple)
                   else np.dtype(v).name if isinstance(v, type) else f"axis{v}"),
)
def test_results_identical_for_any_thread_count(shape, axis, dtype, restore_num_threads):
    rng = np.random.default_rng(2024)
    x = rng.standard_normal(shape, dtype=dtype)
    x += dtype(1.5)
    dy = rng.standard_normal(shape, dtype=dtype)
    c = shape[axis]
    w = rng.uniform(0.5, 2.0, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)

    def run():
        rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
        y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv, axis=axis)
        dx, gw, gb = bnc.batch_norm_backward(dy, x, m, s, w, axis=axis)
        ye, me, se = bnc.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis)
        # eval backward (statistics are constants); reuse ye's memory for dx of eval
        dxe, gwe, gbe = bnc.batch_norm_backward(dy, x, me, se, w, training=False, axis=axis,
                                                out=ye)
        return dict(y=y, m=m, s=s, rm=rm, rv=rv, dx=dx, gw=gw, gb=gb, dxe=dxe, gwe=gwe, gbe=gbe)

    bnc.set_num_threads(1)
    first = run()
    for n in (2, 3):
        bnc.set_num_threads(n)
        again = run()
        for key, value in first.items():
            assert np.array_equal(again[key], value, equal_nan=True), (
                f"{key} differs between 1 and {n} threads"
            )
        del again


THREAD_CASES = [
    ((3, 5), 1, F32),  # tiny
    ((7, 37, 7, 7), 1, F64),  # odd, row family
    ((5, 3, 13, 17), 1, F16),
    ((6, 11, 11, 33), -1, F16),
    ((100003, 5), 1, F32),  # row family, odd N, row blocks merged
    ((600, 3000), 1, F32),  # wide rows: chunks narrower than a row, 128-row blocks, a short last
    ((1, 3, 100000), 1, F64),  # a single row of long segments
    ((33, 77, 29, 31), 1, F32),  # segment family, odd everything, chunks and row blocks
    ((32, 256, 32, 32), 1, F32),  # ~32 MB
    ((64, 64, 28, 28), 1, F32),  # ~13 MB, fused one channel at a time, next channel prefetched
    ((8, 24, 128, 128), 1, F32),  # ~13 MB, channels larger than L2: three groups, next prefetched
    ((64, 32, 32, 64), -1, F32),  # ~16 MB channels-last
]


@pytest.mark.parametrize("shape,axis,dtype", THREAD_CASES, ids=case_id)
def test_every_output_identical_for_threads_1_2_3_4_7_and_repeats(shape, axis, dtype,
                                                                   restore_num_threads):
    """Extends test_results_identical_for_any_thread_count's 1/2/3-thread check: 4 and 7 threads
    (more than cores and, for small shapes, more than tasks), float16, eval outputs, and repeated
    runs."""
    x, dy, w, b, rm, rv = make_inputs(shape, axis, dtype, seed=len(shape) + shape[axis], offset=1.5)
    bnc.set_num_threads(1)
    first = run_everything(x, dy, w, b, rm, rv, axis)
    big = x.nbytes > 8 * 2 ** 20
    for n in (2, 3, 4, 7, 7) if big else (2, 3, 4, 7, 7, 1, 1):
        bnc.set_num_threads(n)
        assert_bitwise(run_everything(x, dy, w, b, rm, rv, axis), first,
                       f"{n} threads vs 1 thread")


# -- every ISA path --------------------------------------------------------------------------------


_ISA_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import bnc
    from bnc import _core
    isa, path, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    assert bnc.config()["isa"] == isa, bnc.config()
    bnc.set_num_threads(2)
    out = {}
    for i, (shape, axis, dtype, offset) in enumerate(cases):
        shape, dtype = tuple(shape), np.dtype(dtype)
        p = np.float32 if dtype == np.float16 else dtype
        rng = np.random.default_rng(i)
        c = shape[axis]
        x = (offset + (1 + abs(offset) * 1e-5) * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        w = rng.uniform(-2, 2, c).astype(p)
        b = rng.standard_normal(c).astype(p)
        for stream in (False, True):
            _core._set_stream_threshold_bytes(0 if stream else -1)
            rm, rv = rng.standard_normal(c).astype(p), rng.uniform(0.5, 2, c).astype(p)
            y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv, momentum=0.3, axis=axis)
            dx, gw, gb = bnc.batch_norm_backward(dy, x, m, s, w, axis=axis)
            ye, me, se = bnc.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis)
            dxe, gwe, gbe = bnc.batch_norm_backward(dy, x, me, se, w, training=False, axis=axis)
            y0, m0, s0 = bnc.batch_norm_forward(x, None, None, axis=axis)
            dx0, _, _ = bnc.batch_norm_backward(dy, x, m0, s0, None, axis=axis)
            for name, a in dict(y=y, m=m, s=s, rm=rm, rv=rv, dx=dx, gw=gw, gb=gb, ye=ye,
                                se=se, dxe=dxe, gwe=gwe, gbe=gbe, y0=y0, dx0=dx0).items():
                out[f"{i}-{int(stream)}-{name}"] = a
    _core._set_stream_threshold_bytes(-1)
    np.savez(path, **out)
    """
)

ISA_CASES = [
    ((3, 5), 1, "float32", 1.0),
    ((33, 37), 1, "float64", 3.0),
    ((7, 37, 7, 7), 1, "float32", -2.0),
    ((5, 3, 13, 17), 1, "float16", 0.5),
    ((4, 19, 70), 1, "float32", 1e5),
    ((6, 11, 11, 33), -1, "float16", 1.0),
    ((6, 11, 11, 33), -1, "float64", 1e8),
    ((2, 64, 30, 30), 1, "float32", 1.0),
    ((1, 3, 1000), 1, "float16", -1.0),
    ((9, 3, 17), 1, "float64", 2.0),
    ((40000, 3), 1, "float32", 1e3),
    ((64, 2, 1030), 1, "float32", 1.0),
    ((16, 14, 14, 64), -1, "float32", 0.0),
]


def test_isa_paths_are_bitwise_identical(tmp_path):
    isas = bnc.config()["isa_available"]
    results = {}
    for isa in isas:
        path = tmp_path / f"{isa}.npz"
        proc = subprocess.run(
            [sys.executable, "-c", _ISA_SCRIPT, isa, str(path), json.dumps(ISA_CASES)],
            env=dict(os.environ, BNC_FORCE_ISA=isa), capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, f"{isa}: {proc.stderr}"
        with np.load(path) as data:
            results[isa] = dict(data)
    base = isas[0]
    assert len(results[base]) == len(ISA_CASES) * 2 * 15
    for isa in isas[1:]:
        for i, case in enumerate(ISA_CASES):
            keys = [k for k in results[base] if k.startswith(f"{i}-")]
            assert_bitwise({k: results[isa][k] for k in keys},
                           {k: results[base][k] for k in keys}, f"{isa} vs {base}, case {case}")


@pytest.mark.parametrize("shape", [(4096, 256), (3000, 96), (64, 32, 7, 7), (37, 3)])
def test_tiny_spread_float32_identical_for_any_thread_count(shape, restore_num_threads):
    """Lanes of tiny spread are summed again in double per task: still the same bits for any
    thread count, and a tiny channel does not change its neighbours' bits."""
    rng = np.random.default_rng(21)
    x = (rng.standard_normal(shape) * 1e-20).astype(np.float32)
    x[:, 0] = rng.standard_normal(x[:, 0].shape).astype(np.float32)  # an ordinary channel
    results = []
    for threads in (1, 2, 3):
        bnc.set_num_threads(threads)
        results.append(bnc.batch_norm_forward(x, eps=1e-45))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b, equal_nan=True)
    # The ordinary channel's bits do not depend on its neighbours being tiny.
    ordinary = rng.standard_normal(shape).astype(np.float32)
    ordinary[:, 0] = x[:, 0]
    y, mean, invstd = bnc.batch_norm_forward(ordinary, eps=1e-45)
    assert np.array_equal(mean[0], results[0][1][0])
    assert np.array_equal(y[:, 0], results[0][0][:, 0])


@pytest.mark.parametrize("shape, dtype", [((1, 1, 1 << 20), np.float32),
                                          ((3, 2, 300001), np.float64),
                                          ((2, 1, 1 << 21), np.float16)])
def test_long_channels_cut_into_blocks_identical_for_any_thread_count(shape, dtype,
                                                                      restore_num_threads):
    """A channel's segments longer than a task are cut into inner blocks (so one long channel
    runs on every thread): fixed by the shape, so the bits do not depend on the thread count."""
    rng = np.random.default_rng(22)
    x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    results = []
    for threads in (1, 2, 3):
        bnc.set_num_threads(threads)
        y, mean, invstd = bnc.batch_norm_forward(x)
        results.append((y, mean, invstd) + bnc.batch_norm_backward(dy, x, mean, invstd))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)
