"""Hypothesis fuzzing of bnc.batch_norm_forward / batch_norm_backward against the reference:
random shapes (sizes 0 and 1 included), channel axes, dtypes, strides, affine options, thread
counts. Deterministic: derandomized, no example database."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import DTYPES, check_against_reference

import bnc

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@st.composite
def _fuzz_case(draw):
    ndim = draw(st.integers(2, 5))
    shape = list(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    if draw(st.booleans()):  # one longer dimension (vector bodies, tails, long segments)
        shape[draw(st.integers(0, ndim - 1))] = draw(st.integers(6, 130))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape[axis] = max(shape[axis], 1)  # channels >= 1
    steps = [draw(st.sampled_from([1, 1, 2, -1, -2])) for _ in range(ndim)]
    return dict(
        shape=tuple(shape), axis=axis, steps=steps,
        dtype=draw(st.sampled_from(DTYPES)),
        training=draw(st.booleans()),
        affine=draw(st.sampled_from(["both", "weight", "none"])),
        seed=draw(st.integers(0, 2**16)),
        threads=draw(st.integers(1, 3)),
    )


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(case=_fuzz_case())
def test_fuzz_against_reference(case):
    shape, axis, dtype = case["shape"], case["axis"], case["dtype"]
    rng = np.random.default_rng(case["seed"])
    # a strided view of the wanted shape: slice a bigger array with the drawn steps
    big = tuple(max(1, s * abs(k)) for s, k in zip(shape, case["steps"]))
    base = (rng.normal(0, 5) + rng.uniform(0.5, 3) * rng.standard_normal(big)).astype(dtype)
    x = base[tuple(slice(None, None, k) for k in case["steps"])][tuple(slice(0, s) for s in shape)]
    assert x.shape == shape
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    w = rng.uniform(-2, 2, c).astype(dtype) if case["affine"] != "none" else None
    b = rng.standard_normal(c).astype(dtype) if case["affine"] == "both" else None
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    training = case["training"]
    per_channel = x.size // c
    old = bnc.get_num_threads()
    bnc.set_num_threads(case["threads"])
    try:
        if per_channel <= 1 and (training or per_channel == 0):
            rm0, rv0 = rm.copy(), rv.copy()
            if per_channel == 1:
                with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
                    bnc.batch_norm_forward(x, w, b, rm, rv, training=True, axis=axis)
            else:  # empty: empty output, nothing updated
                y, _, _ = bnc.batch_norm_forward(x, w, b, rm, rv, training=training, axis=axis)
                assert y.shape == shape and y.dtype == dtype
            np.testing.assert_array_equal(rm, rm0)
            np.testing.assert_array_equal(rv, rv0)
            return
        check_against_reference(x, dy, w, b, rm, rv, training=training, axis=axis)
    finally:
        bnc.set_num_threads(old)



@st.composite
def _large_case(draw):
    """Few rows, many channels or long segments: C up to thousands, inner up to 1e5 (total kept
    under ~4e5 elements so the float64 reference stays quick), random momentum and eps."""
    channels = draw(st.sampled_from([1, 2, 3, 17, 256, 1000, 2049, 4096]))
    budget = 400_000 // channels
    inner = draw(st.integers(1, min(100_000, max(1, budget // 2))))
    outer = draw(st.integers(2, max(2, min(64, budget // inner))))
    layout = draw(st.sampled_from(["first", "last", "reversed"]))
    return dict(
        channels=channels, inner=inner, outer=outer, layout=layout,
        dtype=draw(st.sampled_from(DTYPES)),
        training=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]) | st.floats(0.0, 1.0)),
        eps=draw(st.sampled_from([1e-5, 1e-3, 1.0]) | st.floats(1e-8, 10.0)),
        seed=draw(st.integers(0, 2**16)),
    )


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(case=_large_case())
def test_fuzz_large_channels_and_segments(case):
    rng = np.random.default_rng(case["seed"])
    c, inner, outer = case["channels"], case["inner"], case["outer"]
    dtype = case["dtype"]
    base = (rng.normal(0, 5) + rng.uniform(0.5, 3) * rng.standard_normal((outer, c, inner)))
    if case["layout"] == "first":  # (N, C, L), channel axis 1
        x, axis = base.astype(dtype), 1
    elif case["layout"] == "last":  # (N, L, C) channels-last, contiguous
        x, axis = np.ascontiguousarray(base.transpose(0, 2, 1)).astype(dtype), -1
    else:  # a negative-stride view along the segment axis
        x, axis = base.astype(dtype)[:, :, ::-1], 1
    dy = rng.standard_normal(x.shape).astype(dtype)
    w = rng.uniform(-2, 2, c).astype(dtype if dtype != np.float16 else np.float32)
    b = rng.standard_normal(c).astype(w.dtype)
    rm, rv = rng.standard_normal(c).astype(w.dtype), rng.uniform(0.5, 2, c).astype(w.dtype)
    check_against_reference(x, dy, w, b, rm, rv, training=case["training"], axis=axis,
                            momentum=case["momentum"], eps=case["eps"])
