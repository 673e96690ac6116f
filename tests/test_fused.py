"""Fused epilogues: y = relu(BN(x) + residual) in one pass (training and inference), and the
backward that masks dy by y > 0 in the same pass and returns the residual's gradient.

Against the unfused composite (bitwise where the arithmetic is the same: float32 and float64
compute in their own type, so BN then + residual then ReLU rounds the same), the float64
reference, finite differences; every variant, both layouts, every dtype, the streamed and
in-cache schedules; modules; bad arguments; and a hypothesis fuzz of the new arguments.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from helpers import F16, F32, F64, case_id
from hypothesis import given, settings
from hypothesis import strategies as st

import bnc
from bnc import _core

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [((16, 8, 5, 5), 1), ((16, 5, 5, 8), -1), ((64, 32), 1), ((8, 24, 40, 40), 1),
          ((4, 20, 20, 48), -1), ((3, 5000), 1)]


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (2 + rng.standard_normal(shape)).astype(dtype)
    residual = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, residual, dy


def _params(c, dtype, seed=1):
    rng = np.random.default_rng(seed)
    p = F32 if dtype in (F16, BF16) else dtype
    return ((rng.random(c) + 0.5).astype(p), rng.standard_normal(c).astype(p),
            rng.standard_normal(c).astype(p), (rng.random(c) + 0.5).astype(p))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [F32, F64], ids=case_id)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=str)
def test_forward_equals_the_composite_bitwise(shape, axis, dtype, training, with_residual, relu,
                                              stream_threshold):
    x, residual, _ = _data(shape, dtype)
    c = shape[axis]
    w, b, rm, rv = _params(c, dtype)
    residual = residual if with_residual else None
    for threshold in (-1, 0):  # the default schedule, and everything streamed
        _core._set_stream_threshold_bytes(threshold)
        rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
        y, m, s = bnc.batch_norm_forward(x, w, b, rm1, rv1, training=training, axis=axis,
                                         residual=residual,
                                         activation="relu" if relu else None)
        y0, m0, s0 = bnc.batch_norm_forward(x, w, b, rm2, rv2, training=training, axis=axis)
        want = y0 if residual is None else y0 + residual
        if relu:
            want = np.where(want < 0, dtype(0), want)
        np.testing.assert_array_equal(y, want)
        for got, ref in ((m, m0), (s, s0), (rm1, rm2), (rv1, rv2)):
            np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("shape,axis", SHAPES[:3], ids=str)
def test_forward_half_precision_against_float64(shape, axis, dtype):
    """float16 and bfloat16: one rounding of the float32 result (the composite rounds twice)."""
    x, residual, _ = _data(shape, dtype)
    c = shape[axis]
    w, b, _, _ = _params(c, dtype)
    y, m, s = bnc.batch_norm_forward(x, w, b, axis=axis, residual=residual, activation="relu")
    xd = x.astype(F64)
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mean, var = xd.mean(red, keepdims=True), xd.var(red, keepdims=True)
    bshape = [1] * x.ndim
    bshape[axis] = c
    want = (xd - mean) / np.sqrt(var + 1e-5) * w.reshape(bshape) + b.reshape(bshape)
    want = np.maximum(want + residual.astype(F64), 0)
    ulp = 2.0 ** -10 if dtype == F16 else 2.0 ** -7
    err = np.abs(y.astype(F64) - want)
    assert (err <= ulp * np.abs(want) + 1e-4).all(), err.max()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [F16, F32, F64, BF16], ids=str)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=str)
def test_backward_masks_dy_in_the_same_pass(shape, axis, dtype, training, stream_threshold):
    x, residual, dy = _data(shape, dtype)
    c = shape[axis]
    w, b, rm, rv = _params(c, dtype)
    y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv, training=training, axis=axis,
                                     residual=residual, activation="relu")
    masked = np.where(y.astype(F64) > 0, dy, np.zeros_like(dy))
    for threshold in (-1, 0):
        _core._set_stream_threshold_bytes(threshold)
        dx, gw, gb, gr = bnc.batch_norm_backward(dy, x, m, s, w, training=training, axis=axis,
                                                 activation="relu", y=y,
                                                 return_residual_grad=True)
        dx0, gw0, gb0 = bnc.batch_norm_backward(masked, x, m, s, w, training=training,
                                                axis=axis)
        for got, want in ((dx, dx0), (gw, gw0), (gb, gb0), (gr, masked)):
            assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
        dx2, gw2, gb2 = bnc.batch_norm_backward(dy, x, m, s, w, training=training, axis=axis,
                                                activation="relu", y=y)
        assert np.array_equal(dx2.view(np.uint8), dx0.view(np.uint8))


# Streamed, these keep the ReLU's y > 0 as bits between the backward's reduce and its apply (row
# family, rows of a multiple of 64 elements, unfused; csrc/kernels/impl/bits.h): against the
# composite, with NaN, zeros and negative zeros in y.
BITS_SHAPES = [((256, 1024), 1), ((2048, 64), 1), ((16, 8, 8, 256), -1), ((1024, 192), 1)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [F16, F32, BF16], ids=str)
@pytest.mark.parametrize("shape,axis", BITS_SHAPES, ids=str)
def test_backward_relu_bits_mask_as_y_does(shape, axis, dtype, training, stream_threshold):
    x, _, dy = _data(shape, dtype)
    c = shape[axis]
    w, b, _, _ = _params(c, dtype)
    y, m, s = bnc.batch_norm_forward(x, w, b, axis=axis, activation="relu")
    y.flat[::7] = np.nan
    y.flat[3::11] = 0
    y.flat[5::13] = -0.0
    x.flat[::4099] = np.nan  # (non-finite sums: a lane's rows are summed again in double)
    masked = np.where(y.astype(F64) > 0, dy, np.zeros_like(dy))
    _core._set_stream_threshold_bytes(0)
    dx, gw, gb, gr = bnc.batch_norm_backward(dy, x, m, s, w, training=training, axis=axis,
                                             activation="relu", y=y, return_residual_grad=True)
    dx1, _, _ = bnc.batch_norm_backward(dy, x, m, s, w, training=training, axis=axis,
                                        activation="relu", y=y)
    dx0, gw0, gb0 = bnc.batch_norm_backward(masked, x, m, s, w, training=training, axis=axis)
    for got, want in ((dx, dx0), (dx1, dx0), (gw, gw0), (gb, gb0), (gr, masked)):
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


def test_residual_gradient_without_activation_is_dy():
    x, residual, dy = _data((8, 3, 4), F32)
    y, m, s = bnc.batch_norm_forward(x, residual=residual)
    *_, gr = bnc.batch_norm_backward(dy, x, m, s, return_residual_grad=True)
    assert gr is dy


def test_finite_differences():
    """L = sum(g * relu(BN(x) + r)): dL/dx and dL/dr from the fused backward against central
    differences, float64."""
    rng = np.random.default_rng(3)
    shape = (5, 3, 4)
    x, r = rng.standard_normal(shape), 0.3 * rng.standard_normal(shape)
    g = rng.standard_normal(shape)
    w, b = rng.random(3) + 0.5, rng.standard_normal(3)

    def loss(x, r):
        return float((g * bnc.batch_norm_forward(x, w, b, residual=r, activation="relu")[0]).sum())

    y, m, s = bnc.batch_norm_forward(x, w, b, residual=r, activation="relu")
    dx, gw, gb, gr = bnc.batch_norm_backward(g, x, m, s, w, activation="relu", y=y,
                                             return_residual_grad=True)
    h = 1e-6
    for arr, grad in ((x, dx), (r, gr)):
        num = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            saved = arr[i]
            arr[i] = saved + h
            up = loss(x, r)
            arr[i] = saved - h
            down = loss(x, r)
            arr[i] = saved
            num[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-6)


def test_nan_is_kept_by_the_relu():
    x, residual, dy = _data((16, 4), F32)
    residual[3, 1] = np.nan
    y, m, s = bnc.batch_norm_forward(x, residual=residual, activation="relu")
    assert np.isnan(y[3, 1]) and np.isfinite(np.delete(y.ravel(), 3 * 4 + 1)).all()
    assert (y[np.isfinite(y)] >= 0).all()


def test_module_with_activation_and_residual():
    x, residual, dy = _data((8, 4, 5, 5), F32)
    m = bnc.BatchNorm2d(4, activation="relu")
    plain = bnc.BatchNorm2d(4)
    y = m(x, residual)
    y0 = plain(x)
    np.testing.assert_array_equal(y, np.maximum(y0 + residual, 0))
    dx = m.backward(dy)
    masked = np.where(y > 0, dy, 0).astype(F32)
    np.testing.assert_array_equal(dx, plain.backward(masked))
    np.testing.assert_array_equal(m.grad_residual, masked)
    np.testing.assert_array_equal(m.grad_weight, plain.grad_weight)
    m(x)
    m.backward(dy)
    assert m.grad_residual is None
    assert "activation='relu'" in repr(m)
    with pytest.raises(ValueError, match="activation: expected None or 'relu', got 'gelu'"):
        bnc.BatchNorm1d(3, activation="gelu")


@pytest.mark.parametrize("call,error,match", [
    (lambda x, r, dy, m, s: bnc.batch_norm_forward(x, activation="tanh"), ValueError,
     "activation: expected None or 'relu'"),
    (lambda x, r, dy, m, s: bnc.batch_norm_forward(x, residual=r[:, :2]), ValueError,
     "residual"),
    (lambda x, r, dy, m, s: bnc.batch_norm_forward(x, residual=r.astype(F64)), TypeError,
     "residual: expected dtype float32"),
    (lambda x, r, dy, m, s: bnc.batch_norm_forward(x, residual=r, out=r), ValueError,
     "out"),
    (lambda x, r, dy, m, s: bnc.batch_norm_backward(dy, x, m, s, activation="relu"), ValueError,
     "y: expected the forward's output"),
    (lambda x, r, dy, m, s: bnc.batch_norm_backward(dy, x, m, s, y=x), ValueError,
     "y: expected None without an activation"),
    (lambda x, r, dy, m, s: bnc.batch_norm_backward(dy, x, m, s, activation="relu", y=x[:2]),
     ValueError, "y"),
    (lambda x, r, dy, m, s: bnc.batch_norm_backward(dy, x, m, s, return_residual_grad=1),
     TypeError, "return_residual_grad: expected a bool"),
])
def test_bad_arguments(call, error, match):
    x, r, dy = _data((8, 3), F32)
    _, m, s = bnc.batch_norm_forward(x)
    with pytest.raises(error, match=match):
        call(x, r, dy, m, s)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 9), c=st.integers(1, 7), inner=st.integers(1, 70),
       channels_last=st.booleans(), dtype=st.sampled_from([F32, F64]), training=st.booleans(),
       residual=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_fuzz_fused_equals_composite(n, c, inner, channels_last, dtype, training, residual, relu,
                                     seed):
    shape, axis = ((n, inner, c), -1) if channels_last else ((n, c, inner), 1)
    x, r, dy = _data(shape, dtype, seed)
    w, b, rm, rv = _params(c, dtype, seed)
    r = r if residual else None
    act = "relu" if relu else None
    y, m, s = bnc.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training=training, axis=axis,
                                     residual=r, activation=act)
    y0, _, _ = bnc.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training=training, axis=axis)
    want = y0 if r is None else y0 + r
    if relu:
        want = np.where(want < 0, dtype(0), want)
    np.testing.assert_array_equal(y, want)
    out = bnc.batch_norm_backward(dy, x, m, s, w, training=training, axis=axis, activation=act,
                                  y=y if relu else None, return_residual_grad=residual)
    masked = np.where(y > 0, dy, dtype(0)) if relu else dy
    dx0, gw0, gb0 = bnc.batch_norm_backward(masked, x, m, s, w, training=training, axis=axis)
    np.testing.assert_array_equal(out[0], dx0)
    np.testing.assert_array_equal(out[1], gw0)
    if residual:
        np.testing.assert_array_equal(out[3], masked)
