"""bfloat16 arrays (ml_dtypes' NumPy dtype): every operation against the float64 reference on the
same values, the rounding of the outputs (to nearest even, NaN kept), the same bits on every ISA
path and thread count, and the module taking bfloat16 input."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import bnc
from bnc import _core

BF16 = np.dtype(ml_dtypes.bfloat16)
F32, F64 = np.float32, np.float64
SHAPES = [((64, 32), 1), ((8, 16, 40, 40), 1), ((4, 9, 9, 16), -1), ((2, 3, 100), 1),
          ((3, 5000), 1)]


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (3 + 2 * rng.standard_normal(shape)).astype(BF16)
    dy = rng.standard_normal(shape).astype(BF16)
    return x, dy


def _reference(x, dy, axis):
    """float64 mean, biased variance, y and the training dx of the bfloat16 values."""
    xd, dyd = x.astype(F64), dy.astype(F64)
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mean = xd.mean(red, keepdims=True)
    var = xd.var(red, keepdims=True)
    invstd = 1 / np.sqrt(var + 1e-5)
    xhat = (xd - mean) * invstd
    dx = invstd * (dyd - dyd.mean(red, keepdims=True)
                   - xhat * (dyd * xhat).mean(red, keepdims=True))
    return mean.ravel(), var.ravel(), xhat, dx


def _close_to_bf16(got, want, what):
    """Within bfloat16's rounding of the exact value (8 significant bits) plus float32 noise."""
    assert got.dtype == BF16, f"{what}: dtype {got.dtype}"
    err = np.abs(got.astype(F64) - want)
    bound = 2.0 ** -8 * np.abs(want) + 1e-5 * np.abs(want).max()
    assert (err <= bound).all(), f"{what}: worst error {err.max()} (bound {bound.max()})"


@pytest.mark.parametrize("shape,axis", SHAPES, ids=str)
def test_every_operation_against_float64(shape, axis):
    x, dy = _inputs(shape)
    mean, var, xhat, dx_ref = _reference(x, dy, axis)
    c = shape[axis]
    rm, rv = np.zeros(c, F32), np.ones(c, F32)
    y, save_mean, save_invstd = bnc.batch_norm_forward(x, None, None, rm, rv, axis=axis,
                                                       momentum=1.0)
    assert save_mean.dtype == F32 and save_invstd.dtype == F32
    _close_to_bf16(y, xhat, "y")
    # float partial sums of x - pivot (docs/numerics.md): float32 rounding of the data's scale
    np.testing.assert_allclose(save_mean, mean, rtol=0, atol=2e-7 * np.abs(mean).max())
    n = x.size // c
    np.testing.assert_allclose(rv, var * n / (n - 1), rtol=1e-6)
    dx, gw, gb = bnc.batch_norm_backward(dy, x, save_mean, save_invstd, axis=axis)
    _close_to_bf16(dx, dx_ref, "dx")
    assert gw.dtype == F32 and gb.dtype == F32
    count, smean, m2 = bnc.batch_norm_stats(x, axis=axis)
    np.testing.assert_allclose(smean, mean, rtol=0, atol=2e-7 * np.abs(mean).max())
    np.testing.assert_allclose(m2 / count, var, rtol=1e-6)
    y_eval, _, _ = bnc.batch_norm_forward(x, None, None, rm, rv, training=False, axis=axis)
    assert y_eval.dtype == BF16
    invstd = 1 / np.sqrt(var + 1e-5)
    y2 = bnc.batch_norm_elemt(x, mean, invstd, axis=axis)
    _close_to_bf16(y2, xhat, "elemt")
    sum_dy, sum_dy_xmu = bnc.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
    dx2 = bnc.batch_norm_backward_elemt(dy, x, mean, invstd, None, sum_dy, sum_dy_xmu, count,
                                        axis=axis)
    _close_to_bf16(dx2, dx_ref, "backward_elemt")


def test_rounding_to_nearest_even_and_nan():
    """y = x + bias with mean 0, invstd 1: float32 sums, then rounded as ml_dtypes rounds them
    (to nearest even), bit for bit; a NaN stays a NaN."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4096, 8)).astype(BF16)
    x[3, 2] = np.nan
    bias = rng.standard_normal(8).astype(F32) * 1e-2
    y = bnc.batch_norm_elemt(x, np.zeros(8), np.ones(8), None, bias)
    want = (x.astype(F32) + bias).astype(BF16)
    assert np.array_equal(y.view(np.uint16)[~np.isnan(want.astype(F32))],
                          want.view(np.uint16)[~np.isnan(want.astype(F32))])
    assert np.isnan(y[3, 2].astype(F32)) and np.isfinite(np.delete(y.astype(F32), 26)).all()


@pytest.mark.parametrize("shape,axis", [((8, 16, 40, 40), 1), ((4, 9, 9, 16), -1), ((3, 5000), 1)],
                         ids=str)
def test_same_bits_on_every_isa_and_thread_count(shape, axis, restore_num_threads):
    x, dy = _inputs(shape, seed=1)
    results = []
    active = bnc.config()["isa"]
    try:
        for isa in bnc.config()["isa_available"]:
            for threads in (1, 3):
                _core.select_isa(isa)
                bnc.set_num_threads(threads)
                y, m, s = bnc.batch_norm_forward(x, axis=axis)
                dx, gw, gb = bnc.batch_norm_backward(dy, x, m, s, axis=axis)
                results.append([a.view(np.uint8).copy() for a in (y, m, s, dx, gw, gb)])
    finally:
        _core.select_isa(active)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert np.array_equal(a, b)


def test_module_takes_bfloat16_input():
    x, dy = _inputs((8, 4, 5, 5))
    m = bnc.BatchNorm2d(4)
    y = m(x)
    assert y.dtype == BF16 and m.running_mean.dtype == F32
    dx = m.backward(dy)
    assert dx.dtype == BF16 and m.grad_weight.dtype == F32
    mean, _, xhat, _ = _reference(x, dy, 1)
    _close_to_bf16(y, xhat, "module y")
    np.testing.assert_allclose(m.running_mean, 0.1 * mean, rtol=1e-6)


def test_bfloat16_parameters_are_refused():
    x, _ = _inputs((8, 4))
    with pytest.raises(TypeError, match="weight: expected dtype float32"):
        bnc.batch_norm_forward(x, np.ones(4, BF16))
