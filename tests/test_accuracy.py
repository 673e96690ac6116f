"""Trust tests: the properties a user relies on without re-checking them.

1. accuracy of the statistics when the mean is 1e5 standard deviations from zero (float32), at
   magnitude 1e18 (float32) and at offset 1e8 (float64), in both loop families;
2. the non-temporal-store output path (forced for every size) is bitwise identical to the default;
3. bitwise determinism of every output across thread counts and repeated runs;
4. bitwise identity of every ISA path (no FP contraction, fixed 16-lane reduction order);
5. NaN/Inf in some channels leave the other channels untouched;
6. concurrent calls from Python threads while the thread count changes;
7. no memory leak, and O(C x threads) workspace only (peak RSS of one forward/backward);
8. malformed arguments raise TypeError/ValueError and never crash (what test_errors.py lacks);
9. float16 input with float32 parameters (functional, module, PyTorch parity).

All data is drawn from fixed seeds. Loop families (see csrc/kernels/batch_norm_impl.h): "row"
when the inner size (product of the dimensions after the channel axis) is < 64 -- (N, C),
channels-last, 7x7 -- and "segment" when it is >= 64.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import reference
from helpers import make_inputs

import bnc
from bnc import _core

F16, F32, F64 = np.float16, np.float32, np.float64


# -- helpers ---------------------------------------------------------------------------------------


def _channel_view(shape, axis):
    """Shape that broadcasts a (C,) array along ``axis`` of an array of ``shape``."""
    b = [1] * len(shape)
    b[axis] = shape[axis]
    return tuple(b)


def _per_channel_rows(a, axis):
    """``a`` as float64 of shape (n, C): one column per channel."""
    c = a.shape[axis]
    return np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1).reshape(-1, c)


def exact_stats(x, axis):
    """Per-channel mean and biased variance of the exact values of ``x`` (whatever its dtype),
    computed two-pass in extended precision; and the per-channel count n."""
    c = x.shape[axis]
    xc = np.moveaxis(x.astype(np.longdouble), axis, -1).reshape(-1, c)
    mean = xc.mean(axis=0)
    var = ((xc - mean) ** 2).mean(axis=0)
    return mean.astype(np.float64), var.astype(np.float64), xc.shape[0]


def _inputs(shape, axis, dtype, seed, offset=1.5):
    """x, dy, weight, bias, running_mean, running_var; per-channel arrays in the param dtype."""
    return make_inputs(shape, axis, dtype, seed=seed, offset=offset)


def _run_everything(x, dy, w, b, rm, rv, axis, make_out=None):
    """Every output of a train forward, train backward, eval forward and eval backward.

    ``make_out(like)`` returns the out= buffer to use (None: let bnc allocate)."""
    make_out = make_out or (lambda like: None)
    rm, rv = rm.copy(), rv.copy()
    y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv, momentum=0.3, axis=axis, out=make_out(x))
    dx, gw, gb = bnc.batch_norm_backward(dy, x, m, s, w, axis=axis, out=make_out(x))
    ye, me, se = bnc.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis,
                                        out=make_out(x))
    dxe, gwe, gbe = bnc.batch_norm_backward(dy, x, me, se, w, training=False, axis=axis,
                                            out=make_out(x))
    return dict(y=y.copy(), save_mean=m, save_invstd=s, running_mean=rm, running_var=rv,
                dx=dx.copy(), grad_weight=gw, grad_bias=gb, eval_y=ye.copy(), eval_save_mean=me,
                eval_save_invstd=se, eval_dx=dxe.copy(), eval_grad_weight=gwe,
                eval_grad_bias=gbe)


def _assert_bitwise(got, want, what):
    assert got.keys() == want.keys()
    for key in want:
        a, b = got[key], want[key]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {key} dtype/shape differ"
        if not np.array_equal(a, b, equal_nan=True):
            bad = np.flatnonzero(~((a == b) | (np.isnan(a) & np.isnan(b))).ravel())
            raise AssertionError(
                f"{what}: {key} not bitwise identical at {bad.size} of {a.size} elements "
                f"(first flat index {bad[0]}: {a.ravel()[bad[0]]!r} vs {b.ravel()[bad[0]]!r})"
            )


def _same_bits_for_threads_and_row_orders(run):
    """run() (a dict of arrays) with 1 and 3 threads and the input never streamed, and with 2
    threads and the input always streamed (the other row order of the channels-last reduce):
    asserts the three results bitwise identical and returns the first. Needs the
    stream_threshold and restore_num_threads fixtures."""
    results = []
    for threads, threshold in ((1, 2 ** 62), (3, 2 ** 62), (2, 0)):
        bnc.set_num_threads(threads)
        _core._set_stream_threshold_bytes(threshold)
        results.append(run())
    for other in results[1:]:
        _assert_bitwise(other, results[0], "thread counts or row orders")
    return results[0]


def _forward_momentum_1(x, axis):
    """Training forward from zero running statistics with momentum 1: every output, and the
    running statistics equal to the batch's (the variance unbiased)."""
    c = x.shape[axis]
    rm, rv = np.zeros(c, x.dtype), np.zeros(c, x.dtype)
    y, save_mean, save_invstd = bnc.batch_norm_forward(x, None, None, rm, rv, momentum=1.0,
                                                       axis=axis)
    return dict(y=y, save_mean=save_mean, save_invstd=save_invstd, running_mean=rm,
                running_var=rv)


def _case_id(v):
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    if isinstance(v, type):
        return np.dtype(v).name
    if isinstance(v, int):
        return f"axis{v}"
    return str(v)


# == 1. accuracy ===================================================================================

ACCURACY_CASES = [
    ((4096, 8), 1),  # (N, C): row family
    ((8, 4, 32, 32), 1),  # NCHW, inner 1024: segment family
    ((8, 4, 7, 7), 1),  # NCHW 7x7, inner 49: row family
    ((8, 7, 7, 16), -1),  # channels-last: row family
    ((16, 3, 3, 64), -1),
    ((16, 5, 300), 1),  # (N, C, L): segment family
    ((40000, 3), 1),  # row family, a channel bigger than one fused block: row blocks merged
    ((64, 2, 1030), 1),  # segment family with a tail, row blocks merged
]


@pytest.mark.parametrize("shape,axis", ACCURACY_CASES, ids=_case_id)
def test_float32_statistics_with_mean_1e5_times_std(shape, axis):
    """x = +-s_c * (1e5 + N(0, 1)) in float32: the float32 values are the data. The batch
    variance bnc uses must be within 2e-6 (relative) of the exact variance of those values.

    It is read from running_var (zeros, momentum=1: running_var = unbiased batch variance rounded
    to float32 once) rather than from save_invstd, whose inversion loses float32 precision."""
    rng = np.random.default_rng(100 + len(shape) * 7 + shape[axis])
    c = shape[axis]
    bshape = _channel_view(shape, axis)
    std = rng.uniform(0.5, 2.0, c).reshape(bshape)
    sign = rng.choice([-1.0, 1.0], c).reshape(bshape)
    x = (sign * std * (1e5 + rng.standard_normal(shape))).astype(F32)
    mean, var, n = exact_stats(x, axis)
    eps = 1e-5

    rm, rv = np.zeros(c, F32), np.zeros(c, F32)
    y, save_mean, save_invstd = bnc.batch_norm_forward(x, None, None, rm, rv, momentum=1.0,
                                                       eps=eps, axis=axis)
    np.testing.assert_allclose(rv, var * n / (n - 1), rtol=2e-6, atol=0,
                               err_msg="running_var (unbiased batch variance) is not within 2e-6 "
                                       "of the exact variance")
    np.testing.assert_allclose(rm, mean, rtol=1e-7, atol=0,
                               err_msg="running_mean is not within 1e-7 of the exact mean")
    np.testing.assert_allclose(save_mean, mean, rtol=1e-7, atol=0, err_msg="save_mean")
    np.testing.assert_allclose(save_invstd, 1 / np.sqrt(var + eps), rtol=2e-6, atol=0,
                               err_msg="save_invstd")

    # The normalized output: mean 0 and variance var / (var + eps) per channel. bnc computes
    # y = (x - mean_hi) * scale + (shift - mean_lo * scale), exact where x is close to the mean.
    # PyTorch's y = x * alpha + beta (alpha = invstd, beta = -mean * invstd) rounds x * alpha at
    # magnitude 1e5 (float32 ulp 0.0078) and would miss these bounds by several 1e-3 -- checked
    # below on the same data, so this test can tell the two apart.
    yc = _per_channel_rows(y, axis)
    assert np.isfinite(yc).all()
    assert np.abs(yc.mean(axis=0)).max() < 1e-4, f"y mean per channel: {yc.mean(axis=0)}"
    np.testing.assert_allclose(yc.var(axis=0), var / (var + eps), rtol=0, atol=1e-4,
                               err_msg="variance of y per channel")

    alpha = save_invstd.reshape(bshape)
    beta = (-save_mean.astype(F64) * save_invstd).astype(F32).reshape(bshape)
    naive = _per_channel_rows(x * alpha + beta, axis)  # float32 arithmetic, PyTorch's form
    assert np.abs(naive.mean(axis=0)).max() > 1e-3, "sensitivity check of this test failed"


@pytest.mark.parametrize("magnitude,dy_scale", [(1e18, 1.0), (1e20, 1e20)], ids=_case_id)
@pytest.mark.parametrize("shape,axis", [((4096, 4), 1), ((16, 4, 16, 16), 1),
                                        ((16, 8, 8, 4), -1), ((64, 4, 7, 7), 1),
                                        ((2, 24, 24, 64), -1)], ids=_case_id)
def test_float32_data_of_huge_magnitude(shape, axis, magnitude, dy_scale, stream_threshold):
    """|x| ~ 1e18 (squares ~ 1e36: sums of squares overflow float32) and |x| ~ 1e20 with
    |dy| ~ 1e20 (squares and dy * x overflow float32 even one at a time, so the kernels' float
    partial sums overflow and those channels are summed again in double): finite everything,
    exact enough statistics, normalized y, and a finite backward that matches the reference.
    Both row orders of the row family (cached and streamed input)."""
    for threshold in (2 ** 62, 0):  # never / always streamed
        _core._set_stream_threshold_bytes(threshold)
        _check_huge_magnitude(shape, axis, magnitude, dy_scale)


def _check_huge_magnitude(shape, axis, magnitude, dy_scale):
    rng = np.random.default_rng(200 + shape[axis] + len(shape))
    c = shape[axis]
    bshape = _channel_view(shape, axis)
    sign = rng.choice([-1.0, 1.0], c).reshape(bshape)
    x = (sign * magnitude * (1.0 + 0.1 * rng.standard_normal(shape))).astype(F32)
    assert np.isfinite(x).all()
    mean, var, n = exact_stats(x, axis)

    rm, rv = np.zeros(c, F32), np.zeros(c, F32)
    y, save_mean, save_invstd = bnc.batch_norm_forward(x, None, None, rm, rv, momentum=1.0,
                                                       axis=axis)
    for name, a in (("y", y), ("save_mean", save_mean), ("save_invstd", save_invstd),
                    ("running_mean", rm), ("running_var", rv)):
        assert np.isfinite(a).all(), f"{name} is not finite for data of magnitude {magnitude:g}"
    np.testing.assert_allclose(rv, var * n / (n - 1), rtol=1e-5, atol=0, err_msg="running_var")
    np.testing.assert_allclose(rm, mean, rtol=1e-6, atol=0, err_msg="running_mean")
    np.testing.assert_allclose(save_invstd, 1 / np.sqrt(var), rtol=1e-5, atol=0,
                               err_msg="save_invstd")
    yc = _per_channel_rows(y, axis)
    assert np.abs(yc.mean(axis=0)).max() < 1e-4, f"y mean per channel: {yc.mean(axis=0)}"
    np.testing.assert_allclose(yc.var(axis=0), 1.0, rtol=0, atol=1e-4, err_msg="var of y")

    dy = (dy_scale * rng.standard_normal(shape)).astype(F32)
    w = rng.uniform(0.5, 2.0, c).astype(F32)
    dx, gw, gb = bnc.batch_norm_backward(dy, x, save_mean, save_invstd, w, axis=axis)
    assert np.isfinite(dx).all() and np.isfinite(gw).all() and np.isfinite(gb).all()
    rdx, rgw, rgb = reference.backward(dy, x, save_mean, save_invstd, w, axis=axis)
    np.testing.assert_allclose(dx, rdx, rtol=0, atol=1e-5 * np.abs(rdx).max(), err_msg="dx")
    np.testing.assert_allclose(gw, rgw, rtol=1e-5, atol=1e-5 * np.sqrt(n), err_msg="grad_weight")
    np.testing.assert_allclose(gb, rgb, rtol=1e-5, atol=1e-5 * np.sqrt(n), err_msg="grad_bias")


@pytest.mark.parametrize("shape,axis", [((32, 1024), 1), ((256, 1024), 1), ((4096, 8), 1),
                                        ((8, 7, 7, 16), -1), ((32, 14, 14, 64), -1),
                                        ((64, 5, 7, 7), 1)], ids=_case_id)
def test_float32_variance_of_row_layouts_within_rounding(shape, axis, stream_threshold):
    """Channels-last and (N, C) float32 data sum 8 rows at a time in float: the variance must
    still be within 2.5e-7 of the exact one (float32 rounding alone is up to 6e-8; PyTorch's
    error on (32, 1024) is 2.5e-7), at small batch too, with cached and streamed input."""
    c = shape[axis]
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal(shape).astype(F32)
        mean, var, n = exact_stats(x, axis)
        for threshold in (2 ** 62, 0):
            _core._set_stream_threshold_bytes(threshold)
            rm, rv = np.zeros(c, F32), np.zeros(c, F32)
            bnc.batch_norm_forward(x, None, None, rm, rv, momentum=1.0, axis=axis)
            np.testing.assert_allclose(rv.astype(F64) * (n - 1) / n, var, rtol=2.5e-7, atol=0,
                                       err_msg=f"variance, seed {seed}")


@pytest.mark.parametrize("shape,axis", [((4096, 16), 1), ((16, 8), 1), ((8, 9, 9, 24), -1),
                                        ((8, 6, 10, 10), 1)],  # the last: segment family
                         ids=_case_id)
def test_float32_channels_of_tiny_spread(shape, axis, stream_threshold):
    """|x| ~ 1e-23: squares are below float32's range, so float partial sums of squares would
    vanish; with eps = 1e-60 the variance decides the output. invstd within float rounding of
    the exact one, y normalized."""
    x = (1e-23 * np.random.default_rng(5).standard_normal(shape)).astype(F32)
    mean, var, n = exact_stats(x, axis)
    for threshold in (2 ** 62, 0):
        _core._set_stream_threshold_bytes(threshold)
        y, _, save_invstd = bnc.batch_norm_forward(x, eps=1e-60, axis=axis)
        np.testing.assert_allclose(save_invstd, 1 / np.sqrt(var), rtol=2e-7, atol=0)
        np.testing.assert_allclose(_per_channel_rows(y, axis).astype(F64).var(axis=0), 1.0,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype,var_rtol", [(F32, 3e-7), (F64, 1e-13)], ids=_case_id)
@pytest.mark.parametrize("shape,axis", [
    ((40000, 48), 1),  # (N, C): one chunk of whole rows, many row blocks
    ((40, 30, 30, 48), -1),  # channels-last
    ((64, 24, 40, 40), 1),  # channels of 400 KB: summed in groups of channels
    ((16, 24, 16, 16), 1),  # small channels: reduced and applied chunk by chunk in cache
    ((16, 32, 32, 32), 1),  # 8 such chunks: streamed, a thread reduces its next while it writes
], ids=_case_id)
def test_outlier_first_element_costs_no_digits(shape, axis, dtype, var_rtol, stream_threshold,
                                               restore_num_threads):
    """Each channel's first element is its pivot. Here it is 0 (padding, say) while the channel
    is 1000 +- 1, so sums around the pivot would cancel 6 digits of the variance (float32 data:
    all of them in its float partial sums); every other channel is ordinary. The variance must
    stay within a few ulps of the exact one, bitwise the same for 1 and 3 threads and with
    streamed input (the other row order)."""
    rng = np.random.default_rng(1000 + shape[axis])
    x = (1000 + rng.standard_normal(shape)).astype(dtype)
    first = [0] * x.ndim
    first[axis] = slice(0, None, 2)  # even channels only
    x[tuple(first)] = 0
    mean, var, n = exact_stats(x, axis)
    out = _same_bits_for_threads_and_row_orders(lambda: _forward_momentum_1(x, axis))
    np.testing.assert_allclose(out["running_var"].astype(F64) * (n - 1) / n, var, rtol=var_rtol,
                               atol=0, err_msg="variance")
    np.testing.assert_allclose(out["save_mean"], mean, rtol=var_rtol, atol=0, err_msg="mean")


@pytest.mark.parametrize("k", [5.0, 7.9])
@pytest.mark.parametrize("shape,axis", [((4096, 64), 1), ((32, 16, 16, 64), -1)], ids=_case_id)
def test_pivot_a_few_stds_out_costs_no_digits(shape, axis, k, stream_threshold,
                                              restore_num_threads):
    """The first 8 elements of every channel lie k standard deviations from its mean (a drift,
    or a batch sorted by something): their mean, the pivot, is that far out, which magnifies the
    rounding of the float32 partial sums by about 1 + k^2. Such channels are summed again around
    their mean: the float32 variance stays at float32's own rounding (measured 7.9e-7 at k = 7.9
    before the second pass), bitwise the same for 1 and 3 threads and both row orders."""
    c = shape[axis]
    for seed in range(3):
        rng = np.random.default_rng(seed)
        xc = rng.standard_normal((int(np.prod(shape)) // c, c))
        xc[:8] = k + 0.01 * rng.standard_normal((8, c))
        x = np.ascontiguousarray(np.moveaxis(
            xc.reshape(np.moveaxis(np.empty(shape), axis, -1).shape), -1, axis)).astype(F32)
        mean, var, n = exact_stats(x, axis)
        out = _same_bits_for_threads_and_row_orders(lambda: _forward_momentum_1(x, axis))
        np.testing.assert_allclose(out["running_var"].astype(F64) * (n - 1) / n, var,
                                   rtol=2.5e-7, atol=0,
                                   err_msg=f"variance, pivot {k} std out, seed {seed}")


FOLD_CASES = [
    ((100003, 3), 1),  # several row blocks; the last ends in a partial 16-row super-row
    ((37, 7), 1),  # one fused task: two super-rows and 5 rows
    ((5, 3), 1),  # fewer rows than one super-row
    ((1001, 3, 5), 1),  # inner 5: a lane is a (channel, position, row of 16) triple
    ((21, 13, 17, 3), -1),  # channels-last, 3 channels
    ((4099, 63), 1),  # the widest folded row
    ((4099, 64), 1),  # the narrowest row that is not folded
]


@pytest.mark.parametrize("dtype,rtol", [(F16, 1e-6), (F32, 1e-6), (F64, 1e-13)], ids=_case_id)
@pytest.mark.parametrize("shape,axis", FOLD_CASES, ids=_case_id)
def test_narrow_rows_folded_into_super_rows(shape, axis, dtype, rtol, stream_threshold,
                                            restore_num_threads):
    """Rows narrower than 64 elements are reduced 16 rows at a time. Statistics and gradient
    sums match the exact ones; every output is bitwise the same for 1 and 3 threads and both row
    orders; a NaN in the last (partial) super-row of channel 1 spoils channel 1 only."""
    x, dy, w, b, rm, rv = _inputs(shape, axis, dtype, seed=sum(shape))
    mean, var, n = exact_stats(x, axis)
    out = _same_bits_for_threads_and_row_orders(
        lambda: _run_everything(x, dy, w, b, rm, rv, axis))
    np.testing.assert_allclose(out["save_mean"], mean, rtol=rtol, atol=1e-30, err_msg="mean")
    np.testing.assert_allclose(1 / out["save_invstd"].astype(F64) ** 2 - 1e-5, var,
                               rtol=max(rtol, 1e-12), atol=0, err_msg="variance")
    x64, w64, b64 = x.astype(F64), w.astype(F64), b.astype(F64)
    ref_y = reference.forward(x64, w64, b64, axis=axis)[0]
    ref_dx, ref_gw, ref_gb = reference.backward(dy.astype(F64), x64, out["save_mean"],
                                                out["save_invstd"], w64, axis=axis)
    sums_tol = dict(rtol=1e-5, atol=1e-6 * n)
    np.testing.assert_allclose(out["grad_bias"], ref_gb, **sums_tol, err_msg="grad_bias")
    np.testing.assert_allclose(out["grad_weight"], ref_gw, **sums_tol, err_msg="grad_weight")
    tol = 4e-3 if dtype == F16 else 1e-5
    np.testing.assert_allclose(out["y"], ref_y, rtol=tol, atol=tol, err_msg="y")
    np.testing.assert_allclose(out["dx"], ref_dx, rtol=tol, atol=tol, err_msg="dx")

    bad = x.copy()
    np.moveaxis(bad, axis, -1)[(-1,) * (x.ndim - 1) + (1,)] = np.nan  # last row, channel 1
    with pytest.warns(RuntimeWarning, match="1 of"):
        spoiled = _run_everything(bad, dy, w, b, rm, rv, axis)
    others = [c for c in range(shape[axis]) if c != 1]
    for key in ("y", "dx", "save_mean", "save_invstd", "grad_weight", "grad_bias"):
        a, b_ = spoiled[key], out[key]
        if a.ndim > 1:
            a, b_ = np.take(a, others, axis=axis), np.take(b_, others, axis=axis)
        else:
            a, b_ = a[others], b_[others]
        assert np.array_equal(a, b_), f"{key}: a NaN in channel 1 changed other channels"


@pytest.mark.parametrize("shape,axis", [((4096, 8), 1), ((8, 4, 32, 32), 1),
                                        ((8, 4, 7, 7), 1), ((8, 7, 7, 16), -1),
                                        ((16, 5, 300), 1)], ids=_case_id)
def test_float64_statistics_at_offset_1e8(shape, axis):
    rng = np.random.default_rng(300 + shape[axis])
    c = shape[axis]
    x = 1e8 * rng.choice([-1.0, 1.0], c).reshape(_channel_view(shape, axis)) + \
        rng.standard_normal(shape)
    mean, var, n = exact_stats(x, axis)
    rm, rv = np.zeros(c), np.zeros(c)
    y, save_mean, _ = bnc.batch_norm_forward(x, None, None, rm, rv, momentum=1.0, axis=axis)
    np.testing.assert_allclose(rv, var * n / (n - 1), rtol=1e-9, atol=0,
                               err_msg="float64 variance at offset 1e8 not within 1e-9")
    np.testing.assert_allclose(rm, mean, rtol=1e-15, atol=0, err_msg="running_mean")
    np.testing.assert_allclose(save_mean, mean, rtol=1e-15, atol=0, err_msg="save_mean")
    yc = _per_channel_rows(y, axis)
    assert np.abs(yc.mean(axis=0)).max() < 1e-7
    np.testing.assert_allclose(yc.var(axis=0), var / (var + 1e-5), rtol=0, atol=1e-9)


# == 2. streaming (non-temporal) stores ============================================================


@pytest.fixture
def stream_threshold():
    """Yields the default threshold; always restores it, even when the test fails."""
    default = _core.stream_threshold_bytes()
    try:
        yield default
    finally:
        _core._set_stream_threshold_bytes(-1)
    assert _core.stream_threshold_bytes() == default


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


@pytest.mark.parametrize("dtype", [F16, F32, F64], ids=_case_id)
@pytest.mark.parametrize("shape,axis", STREAM_SHAPES, ids=_case_id)
def test_streaming_stores_are_bitwise_identical(shape, axis, dtype, stream_threshold):
    x, dy, w, b, rm, rv = _inputs(shape, axis, dtype, seed=sum(shape))
    assert x.nbytes < stream_threshold, "precondition: the default path must not stream here"
    for offset in (0, 1, 3, 5):
        make_out = _out_maker(offset)
        _core._set_stream_threshold_bytes(-1)
        plain = _run_everything(x, dy, w, b, rm, rv, axis, make_out)
        plain_alloc = _run_everything(x, dy, w, b, rm, rv, axis)
        _assert_bitwise(plain_alloc, plain, f"out offset {offset} vs allocated")
        _core._set_stream_threshold_bytes(0)
        assert _core.stream_threshold_bytes() == 0
        streamed = _run_everything(x, dy, w, b, rm, rv, axis, make_out)
        streamed_alloc = _run_everything(x, dy, w, b, rm, rv, axis)
        _core._set_stream_threshold_bytes(-1)
        for key, value in streamed.items():
            assert not np.isnan(value).any(), f"{key}: not every element was written (streaming)"
        _assert_bitwise(streamed, plain, f"streaming vs default, out offset {offset}")
        _assert_bitwise(streamed_alloc, plain, "streaming (allocated out) vs default")


def test_large_tensor_streaming_and_not_are_bitwise_identical(stream_threshold,
                                                              restore_num_threads):
    """A 16 MB tensor written with streaming stores (threshold 0) and with plain stores
    (threshold 2**62), whatever the default is on this machine."""
    x, dy, w, b, rm, rv = _inputs((16, 256, 32, 32), 1, F32, seed=7)
    bnc.set_num_threads(2)
    _core._set_stream_threshold_bytes(2 ** 62)
    plain = _run_everything(x, dy, w, b, rm, rv, 1)
    _core._set_stream_threshold_bytes(0)
    streamed = _run_everything(x, dy, w, b, rm, rv, 1)
    _assert_bitwise(streamed, plain, "32 MB tensor, streaming vs plain stores")


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


# == 3. determinism across thread counts ===========================================================

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


@pytest.mark.parametrize("shape,axis,dtype", THREAD_CASES, ids=_case_id)
def test_every_output_identical_for_threads_1_2_3_4_7_and_repeats(shape, axis, dtype,
                                                                   restore_num_threads):
    """Extends test_forward_backward's 1/2/3-thread check: 4 and 7 threads (more than cores and,
    for small shapes, more than tasks), float16, eval outputs, and repeated runs."""
    x, dy, w, b, rm, rv = _inputs(shape, axis, dtype, seed=len(shape) + shape[axis])
    bnc.set_num_threads(1)
    first = _run_everything(x, dy, w, b, rm, rv, axis)
    big = x.nbytes > 8 * 2 ** 20
    for n in (2, 3, 4, 7, 7) if big else (2, 3, 4, 7, 7, 1, 1):
        bnc.set_num_threads(n)
        _assert_bitwise(_run_everything(x, dy, w, b, rm, rv, axis), first,
                        f"{n} threads vs 1 thread")


# == 4. every ISA path is bitwise identical ========================================================

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
            _assert_bitwise({k: results[isa][k] for k in keys},
                            {k: results[base][k] for k in keys}, f"{isa} vs {base}, case {case}")


# == 5. non-finite input ===========================================================================

NONFINITE_CASES = [((64, 6), 1), ((8, 6, 5, 5), 1), ((8, 5, 5, 6), -1), ((4, 6, 100), 1)]
NAN_CHANNEL, INF_CHANNEL = 1, 4


def _with_bad_values(x, axis, where):
    """Copy of x with a NaN in channel 1 and +Inf in channel 4 ('first': at the channel's first
    element, which bnc uses as the channel's pivot; 'middle': somewhere inside)."""
    xb = x.copy()
    xc = np.moveaxis(xb, axis, -1)  # a view: writes go to xb
    rest = xc.shape[:-1]
    count = int(np.prod(rest))
    i, j = (0, 0) if where == "first" else (count // 2 + 1, count // 2 + 4)
    xc[np.unravel_index(i, rest) + (NAN_CHANNEL,)] = np.nan
    xc[np.unravel_index(j, rest) + (INF_CHANNEL,)] = np.inf
    return xb


def _take(a, axis, idx):
    return np.ascontiguousarray(np.take(a, idx, axis=axis))


@pytest.mark.parametrize("where", ["first", "middle"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=_case_id)
@pytest.mark.parametrize("shape,axis", NONFINITE_CASES, ids=_case_id)
def test_nan_and_inf_channels_leave_other_channels_untouched(shape, axis, dtype, where):
    x, dy, w, b, rm, rv = _inputs(shape, axis, dtype, seed=41)
    c = shape[axis]
    good = [k for k in range(c) if k not in (NAN_CHANNEL, INF_CHANNEL)]
    xb = np.ascontiguousarray(_with_bad_values(x, axis, where))
    assert np.isnan(xb).sum() == 1 and np.isinf(xb).sum() == 1

    rm_b, rv_b = rm.copy(), rv.copy()
    with pytest.warns(RuntimeWarning, match=f"2 of {c} channels are not finite"):
        y, m, s = bnc.batch_norm_forward(xb, w, b, rm_b, rv_b, axis=axis)
    # The same channels computed on their own (only their data, their parameters).
    rm_g, rv_g = rm[good].copy(), rv[good].copy()
    xg = _take(x, axis, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yg, mg, sg = bnc.batch_norm_forward(xg, w[good], b[good], rm_g, rv_g, axis=axis)
    np.testing.assert_array_equal(_take(y, axis, good), yg, err_msg="y of the finite channels")
    np.testing.assert_array_equal(m[good], mg)
    np.testing.assert_array_equal(s[good], sg)
    np.testing.assert_array_equal(rm_b[good], rm_g, err_msg="running_mean of finite channels")
    np.testing.assert_array_equal(rv_b[good], rv_g, err_msg="running_var of finite channels")
    assert not (rm_g == rm[good]).all(), "the finite channels' running stats must be updated"
    for k in (NAN_CHANNEL, INF_CHANNEL):
        assert not np.isfinite(_take(y, axis, [k])).any(), f"y of non-finite channel {k}"
        assert rm_b[k] == rm[k] and rv_b[k] == rv[k], f"running stats of channel {k} updated"

    # Backward with the saved (partly non-finite) statistics: finite channels unaffected.
    dx, gw, gb = bnc.batch_norm_backward(dy, xb, m, s, w, axis=axis)
    dxg, gwg, gbg = bnc.batch_norm_backward(_take(dy, axis, good), xg, mg, sg, w[good], axis=axis)
    np.testing.assert_array_equal(_take(dx, axis, good), dxg, err_msg="dx of finite channels")
    np.testing.assert_array_equal(gw[good], gwg)
    np.testing.assert_array_equal(gb[good], gbg)
    for k in (NAN_CHANNEL, INF_CHANNEL):
        assert not np.isfinite(_take(dx, axis, [k])).any(), f"dx of non-finite channel {k}"

    # Eval: elementwise; only the two bad elements are not finite.
    ye, _, _ = bnc.batch_norm_forward(xb, w, b, rm, rv, training=False, axis=axis)
    ye_clean, _, _ = bnc.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis)
    finite = np.isfinite(xb)
    np.testing.assert_array_equal(ye[finite], ye_clean[finite])
    assert not np.isfinite(ye[~finite]).any()


@pytest.mark.parametrize("axis", [1, -1])
def test_module_with_nan_and_inf_channels(axis):
    shape = (8, 6, 5, 5) if axis == 1 else (8, 5, 5, 6)
    x, dy, _, _, _, _ = _inputs(shape, axis, F32, seed=42)
    xb = np.ascontiguousarray(_with_bad_values(x, axis, "middle"))
    good = [0, 2, 3, 5]
    m = bnc.BatchNorm2d(6, axis=axis)
    ref = bnc.BatchNorm2d(4, axis=axis)
    m.weight[:] = np.arange(1, 7)
    ref.weight[:] = m.weight[good]
    with pytest.warns(RuntimeWarning, match="2 of 6 channels are not finite"):
        y = m(xb)
    assert m.num_batches_tracked == 1, "a batch with non-finite channels is still counted"
    yg = ref(_take(x, axis, good))
    np.testing.assert_array_equal(_take(y, axis, good), yg)
    np.testing.assert_array_equal(m.running_mean[good], ref.running_mean)
    np.testing.assert_array_equal(m.running_var[good], ref.running_var)
    assert (m.running_mean[[NAN_CHANNEL, INF_CHANNEL]] == 0).all()
    assert (m.running_var[[NAN_CHANNEL, INF_CHANNEL]] == 1).all()
    dx = m.backward(dy)
    dxg = ref.backward(_take(dy, axis, good))
    np.testing.assert_array_equal(_take(dx, axis, good), dxg)
    np.testing.assert_array_equal(m.grad_weight[good], ref.grad_weight)
    # a second, clean batch updates every channel again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)
    assert m.num_batches_tracked == 2
    assert np.isfinite(m.running_mean).all() and (m.running_mean != 0).all()


# == 6. concurrency ================================================================================

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
    data = [_inputs(shape, axis, dtype, seed=60 + i)
            for i, (shape, axis, dtype) in enumerate(CONCURRENT_CASES)]

    def run(i):
        x, dy, w, b, rm, rv = data[i]
        return _run_everything(x, dy, w, b, rm, rv, CONCURRENT_CASES[i][1])

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
            _assert_bitwise(run(i), expected[i], f"python thread {i}, repetition {rep}")
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


# == 7. memory =====================================================================================


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_no_memory_leak_over_100k_calls():
    rng = np.random.default_rng(70)
    x = rng.standard_normal((8, 4)).astype(F32)
    dy = rng.standard_normal((8, 4)).astype(F32)
    w, b = np.ones(4, F32), np.zeros(4, F32)
    rm, rv = np.zeros(4, F32), np.ones(4, F32)
    out, dx = np.empty_like(x), np.empty_like(x)
    sm, si, gw, gb = (np.empty(4, F32) for _ in range(4))
    bad_out = np.empty((8, 5), F32)
    refcounts = [sys.getrefcount(a) for a in (x, dy, w, b, rm, rv, out, dx, sm, si, gw, gb)]

    def step(i):
        if i % 8:
            # the bindings directly: where a leak would be
            _core.forward_train(x, out, w, b, rm, rv, 1, 1e-5, 0.1, sm, si)
            _core.backward(dy, x, dx, sm, si, w, 1, True, gw, gb)
            _core.forward_eval(x, out, w, b, rm, rv, 1, 1e-5, sm, si)
        else:
            y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv, out=out)
            bnc.batch_norm_backward(dy, x, m, s, w, out=dx)
        if i % 10 == 3:  # an error path: the exception is raised from C++
            try:
                _core.forward_train(x, bad_out, w, b, rm, rv, 1, 1e-5, 0.1, sm, si)
            except ValueError:
                pass
            else:
                raise AssertionError("expected ValueError")

    for i in range(10_000):
        step(i)
    gc.collect()
    rss_10k = _rss_bytes()
    for i in range(10_000, 100_000):
        step(i)
    gc.collect()
    growth = _rss_bytes() - rss_10k
    assert growth < 2 * 2 ** 20, f"resident memory grew by {growth} bytes over 90,000 calls"
    after = [sys.getrefcount(a) for a in (x, dy, w, b, rm, rv, out, dx, sm, si, gw, gb)]
    assert after == refcounts, "reference counts of the arguments changed (leaked references)"


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import bnc

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
        raise LookupError(field)

    def rss():
        return status("VmRSS")

    def peak():
        # VmHWM: the peak RSS of this process image. (getrusage's ru_maxrss is no good here: Linux
        # carries it over fork + exec, so a child starts with the parent's -- pytest's -- peak.)
        return status("VmHWM")

    bnc.set_num_threads(int(sys.argv[1]))
    # warm up: start the OpenMP team and touch the code paths with a small multi-threaded call
    w = np.random.default_rng(0).standard_normal((8, 64, 32, 32), dtype=np.float32)
    yw, mw, sw = bnc.batch_norm_forward(w)
    bnc.batch_norm_backward(w, w, mw, sw)
    bnc.batch_norm_forward(np.moveaxis(w, 1, -1).copy(), axis=-1)
    del w, yw

    n = 16 * 2**20  # 64 MB of float32
    rng = np.random.default_rng(1)
    x = np.empty(n, np.float32)
    rng.standard_normal(out=x, dtype=np.float32)  # no temporaries: current RSS is the peak
    dy = np.empty(n, np.float32)
    rng.standard_normal(out=dy, dtype=np.float32)
    out = np.zeros(n, np.float32)
    out.fill(1.0)
    result = {"slack": peak() - rss()}
    for name, shape, axis in (("nchw", (64, 64, 64, 64), 1), ("nhwc", (64, 64, 64, 64), -1),
                              ("nc", (2**20, 16), 1), ("ncl", (8, 4, n // 32), 1)):
        xs, dys, outs = x.reshape(shape), dy.reshape(shape), out.reshape(shape)
        c = shape[axis]
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        before = peak()
        y, m, s = bnc.batch_norm_forward(xs, None, None, rm, rv, axis=axis, out=outs)
        result[name + "-forward"] = peak() - before
        before = peak()
        bnc.batch_norm_forward(xs, None, None, rm, rv, training=False, axis=axis, out=outs)
        result[name + "-eval"] = peak() - before
        before = peak()
        bnc.batch_norm_backward(dys, xs, m, s, None, axis=axis, out=outs)
        result[name + "-backward"] = peak() - before
    result["rss_final_minus_peak"] = rss() - peak()
    print(json.dumps(result))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_peak_memory_of_forward_and_backward_with_out(tmp_path):
    """With out= preallocated, one forward / backward on 64 MB of float32 raises the peak RSS by
    less than 4 MB: the kernels allocate only O(C x threads) workspace, no copy of the tensor.
    Measured in a fresh interpreter (the peak RSS never goes down)."""
    threads = max(2, min(4, os.cpu_count() or 1))
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(threads)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # the measurement is only meaningful if RSS was at its peak when it started
    assert result.pop("slack") < 2 * 2 ** 20, result
    result.pop("rss_final_minus_peak")
    too_much = {k: v for k, v in result.items() if v >= 4 * 2 ** 20}
    assert not too_much, f"peak RSS increase (bytes) of 4 MB or more: {too_much} (all: {result})"


# == 8. malformed arguments ========================================================================

# Values accepted as an input array (weight, bias, ...) or an output array: anything else must
# raise TypeError or ValueError.


def _bad_values(shape, dtype, *, required, output, aliases=(), float16_ok=False):
    """(name, value) pairs that must be rejected for an array argument of ``shape``/``dtype``.

    required: None is rejected; output: written in place (read-only and strided are rejected);
    float16_ok: a float16 array is valid (the input x of float32 parameters)."""
    other_float = F64 if dtype != F64 else F32
    # one more channel (axis 1 of a batch, axis 0 of a per-channel array)
    wrong_shape = list(shape)
    wrong_shape[1 if len(shape) > 1 else 0] += 1
    wrong_shape = tuple(wrong_shape)
    bad = [
        ("list", np.ones(shape, dtype).tolist()),
        ("str", "abc"),
        ("int", 7),
        ("float", 1.5),
        ("0-d", np.array(1.0, dtype)),
        ("int64", np.ones(shape, np.int64)),
        ("int32", np.ones(shape, np.int32)),
        ("complex", np.ones(shape, np.complex64)),
        ("complex128", np.ones(shape, np.complex128)),
        ("bool", np.ones(shape, bool)),
        ("object", np.full(shape, None, dtype=object)),
        ("object-floats", np.ones(shape, dtype).astype(object)),
        ("other-float", np.ones(shape, other_float)),
        ("float16", np.ones(shape, F16)) if dtype != F16 else ("float64", np.ones(shape, F64)),
        ("big-endian", np.ones(shape, np.dtype(dtype).newbyteorder(">"))),
        ("wrong-shape", np.ones(wrong_shape, dtype)),
        ("extra-dim", np.ones(shape + (1,), dtype)),
        ("void", np.zeros(shape, "V4")),
        ("datetime", np.zeros(shape, "M8[s]")),
        ("structured", np.zeros(shape, [("a", dtype)])),
    ]
    if float16_ok:
        bad = [(n, v) for n, v in bad if n != "float16"]
    if required:
        bad.append(("None", None))
    if output:
        ro = np.ones(shape, dtype)
        ro.flags.writeable = False
        neg = np.ones((shape[0] * 2,) + shape[1:], dtype)[::-2]
        bad += [("read-only", ro), ("negative-stride", neg)]
        if len(shape) > 1:
            bad.append(("fortran", np.ones(shape, dtype, order="F")))
    bad += list(aliases)
    return bad


def _rejects(fn, what):
    """Calls fn(); returns a description of the failure unless it raised TypeError/ValueError."""
    try:
        fn()
    except (TypeError, ValueError):
        return None
    except Exception as error:  # noqa: BLE001 - any other exception type is the failure
        return f"{what}: raised {type(error).__name__}: {error}"
    return f"{what}: accepted"


@contextlib.contextmanager
def _collect(failures):
    """Collects _rejects() results (None: rejected as it should be) and fails with the rest."""
    yield
    bad = [f for f in failures if f]
    assert not bad, "not rejected with TypeError/ValueError:\n" + "\n".join(bad)


def _snapshot(*arrays):
    return [np.array(a, copy=True) for a in arrays]


def _unchanged(arrays, before):
    return all(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
               for a, b in zip(arrays, before))


@pytest.mark.parametrize("dtype", [F32, F16], ids=_case_id)
def test_functional_forward_rejects_malformed_arguments(dtype):
    shape, c = (4, 3, 5), 3
    p = F32 if dtype == F16 else dtype
    rng = np.random.default_rng(80)
    x = rng.standard_normal(shape).astype(dtype)
    good = dict(weight=np.ones(c, p), bias=np.zeros(c, p), running_mean=np.zeros(c, p),
                running_var=np.ones(c, p), out=np.full(shape, 7, dtype))
    failures = []
    with _collect(failures):
        for training in (True, False):
            def call(**over):
                args = dict(good, **over)
                kwargs = {k: args.pop(k) for k in ("training", "momentum", "eps", "axis", "out")
                          if k in args}
                xa = args.pop("x", x)
                return lambda: bnc.batch_norm_forward(xa, **args, training=training, **kwargs)

            owned = [x, good["running_mean"], good["running_var"], good["out"]]
            before = _snapshot(*owned)
            for name, value in _bad_values(shape, dtype, required=True, output=False,
                                           float16_ok=True):
                failures.append(_rejects(call(x=value), f"training={training} x={name}"))
            for name, value in _bad_values(shape, dtype, required=False, output=True,
                                           aliases=[("aliasing-x", x)]):
                failures.append(_rejects(call(out=value), f"training={training} out={name}"))
            buf = np.ones((shape[0] + 1,) + shape[1:], dtype)
            failures.append(_rejects(call(x=buf[:-1], out=buf[1:]),
                                     f"training={training} out partially overlapping x"))
            for arg in ("weight", "bias", "running_mean", "running_var"):
                # running statistics are written only when training; in eval, like weight and
                # bias, a strided or read-only array is fine (it is only read)
                in_place = arg.startswith("running") and training
                for name, value in _bad_values((c,), p, required=False, output=in_place):
                    if name == "negative-stride" and not in_place:
                        continue
                    failures.append(_rejects(call(**{arg: value}),
                                             f"training={training} {arg}={name}"))
            if not training:
                for arg in ("running_mean", "running_var"):
                    failures.append(_rejects(call(**{arg: None}), f"eval {arg}=None"))
            # per-channel arrays aliasing each other or x, when written in place (training)
            if training:
                shared = np.zeros(c, p)
                failures.append(_rejects(call(running_mean=shared, running_var=shared),
                                         "running_mean is running_var"))
                failures.append(_rejects(call(running_mean=good["weight"]),
                                         "running_mean is weight"))
            for eps in (float("nan"), float("inf"), -1.0, 0.0, -0.0, "1e-5", None, 1e-5j, True,
                        np.array([1e-5])):
                failures.append(_rejects(call(eps=eps), f"training={training} eps={eps!r}"))
            for axis in (3, -4, 2 ** 63, -(2 ** 63), 2 ** 70, 1.0, "1", None, True,
                         np.float64(1.0), np.array([1])):
                failures.append(_rejects(call(axis=axis), f"training={training} axis={axis!r}"))
            if training:
                for momentum in (float("nan"), float("inf"), -float("inf"), "0.1", None, True,
                                 0.1j):
                    failures.append(_rejects(call(momentum=momentum),
                                             f"momentum={momentum!r}"))
            assert _unchanged(owned, before), "a rejected call modified x, running stats or out"


@pytest.mark.parametrize("dtype", [F32, F16], ids=_case_id)
def test_functional_backward_rejects_malformed_arguments(dtype):
    shape, c = (4, 3, 5), 3
    p = F32 if dtype == F16 else dtype
    rng = np.random.default_rng(81)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    good = dict(dy=dy, x=x, save_mean=np.zeros(c, p), save_invstd=np.ones(c, p),
                weight=np.ones(c, p), out=np.full(shape, 7, dtype))
    failures = []
    with _collect(failures):
        for training in (True, False):
            def call(**over):
                a = dict(good, **over)
                return lambda: bnc.batch_norm_backward(
                    a["dy"], a["x"], a["save_mean"], a["save_invstd"], a["weight"],
                    training=training, axis=a.get("axis", 1), out=a["out"])

            before = _snapshot(x, dy, good["out"])
            for arg in ("dy", "x"):
                for name, value in _bad_values(shape, dtype, required=True, output=False):
                    failures.append(_rejects(call(**{arg: value}), f"{arg}={name}"))
            for name, value in _bad_values(shape, dtype, required=False, output=True,
                                           aliases=[("aliasing-x", x), ("aliasing-dy", dy)]):
                failures.append(_rejects(call(out=value), f"out={name}"))
            for arg in ("save_mean", "save_invstd", "weight"):
                for name, value in _bad_values((c,), p, required=arg != "weight", output=False):
                    failures.append(_rejects(call(**{arg: value}), f"{arg}={name}"))
            for axis in (3, -4, 2 ** 70, 1.0, "1", None, True):
                failures.append(_rejects(call(axis=axis), f"axis={axis!r}"))
            assert _unchanged([x, dy, good["out"]], before), "a rejected call modified its input"


def test_module_rejects_malformed_input_and_state():
    rng = np.random.default_rng(82)
    x = rng.standard_normal((4, 3, 2, 2)).astype(F32)
    failures = []
    with _collect(failures):
        for training in (True, False):
            m = bnc.BatchNorm2d(3).train(training)
            m(x)
            state = m.state_dict()
            for name, value in _bad_values(x.shape, F32, required=True, output=False,
                                           float16_ok=True):
                failures.append(_rejects(lambda: m(value), f"training={training} x={name}"))
            for name, value in _bad_values(x.shape, F32, required=True, output=False):
                failures.append(_rejects(lambda: m.backward(value),
                                         f"training={training} backward dy={name}"))
            # corrupted attributes are caught by the functional layer, not crashed on
            corruptions = [
                ("weight", np.ones(3, F64)), ("weight", [1.0, 1.0, 1.0]), ("bias", np.ones(4, F32)),
                ("bias", np.ones(3, np.complex64)), ("running_mean", np.ones(3, object)),
                ("running_var", np.ones(3, np.int32)), ("eps", float("nan")), ("eps", -1.0),
                ("eps", "x"), ("axis", 7), ("axis", "1"), ("axis", 1.0),
            ]
            if training:
                ro = np.zeros(3, F32)
                ro.flags.writeable = False
                corruptions += [("momentum", float("nan")), ("momentum", "0.1"),
                                ("running_mean", ro), ("running_var", np.ones(6, F32)[::2])]
            else:
                corruptions += [("running_var", None)]
            for attr, value in corruptions:
                saved = getattr(m, attr)
                setattr(m, attr, value)
                try:
                    failures.append(_rejects(lambda: m(x),
                                             f"training={training} {attr}={value!r}"))
                finally:
                    setattr(m, attr, saved)
            after = m.state_dict()
            for k in state:
                assert np.array_equal(state[k], after[k]), f"a rejected call changed {k}"


def _core_args(func, dtype=F32):
    shape, c = (4, 3), 3
    p = F32 if dtype == F16 else dtype
    rng = np.random.default_rng(83)
    x = rng.standard_normal(shape).astype(dtype)
    if func == "forward_train":
        return dict(x=x, out=np.full(shape, 9, dtype), weight=np.ones(c, p), bias=np.zeros(c, p),
                    running_mean=np.zeros(c, p), running_var=np.ones(c, p), axis=1, eps=1e-5,
                    momentum=0.1, save_mean=np.full(c, 9, p), save_invstd=np.full(c, 9, p))
    if func == "forward_eval":
        return dict(x=x, out=np.full(shape, 9, dtype), weight=np.ones(c, p), bias=np.zeros(c, p),
                    running_mean=np.zeros(c, p), running_var=np.ones(c, p), axis=1, eps=1e-5,
                    save_mean=np.full(c, 9, p), save_invstd=np.full(c, 9, p))
    return dict(dy=rng.standard_normal(shape).astype(dtype), x=x, out=np.full(shape, 9, dtype),
                save_mean=np.zeros(c, p), save_invstd=np.ones(c, p), weight=np.ones(c, p), axis=1,
                training=True, grad_weight=np.full(c, 9, p), grad_bias=np.full(c, 9, p))


_CORE_OPTIONAL = {"forward_train": {"weight", "bias", "running_mean", "running_var"},
                  "forward_eval": {"weight", "bias"}, "backward": {"weight"}}
_CORE_OUTPUTS = {"forward_train": {"out", "running_mean", "running_var", "save_mean",
                                   "save_invstd"},
                 "forward_eval": {"out", "save_mean", "save_invstd"},
                 "backward": {"out", "grad_weight", "grad_bias"}}


@pytest.mark.parametrize("dtype", [F32, F16, F64], ids=_case_id)
@pytest.mark.parametrize("func", ["forward_train", "forward_eval", "backward"])
def test_core_kernels_reject_malformed_arguments(func, dtype):
    """bnc._core called directly: every array argument with every bad value, bad axes, eps and
    booleans. Nothing may be written, nothing may crash."""
    fn = getattr(_core, func)
    base = _core_args(func, dtype)
    failures = []
    with _collect(failures):
        for arg, value0 in base.items():
            if not isinstance(value0, np.ndarray):
                continue
            bad = _bad_values(value0.shape, value0.dtype.type, required=arg not in
                              _CORE_OPTIONAL[func], output=arg in _CORE_OUTPUTS[func])
            # every array must be C-contiguous in _core, inputs too
            if arg not in _CORE_OUTPUTS[func]:
                bad.append(("negative-stride",
                            np.ones((value0.shape[0] * 2,) + value0.shape[1:],
                                    value0.dtype)[::-2]))
            # an output aliasing any other argument
            if arg in _CORE_OUTPUTS[func]:
                bad += [(f"alias-{k}", v) for k, v in base.items()
                        if k != arg and isinstance(v, np.ndarray) and v.shape == value0.shape]
            for name, value in bad:
                args = _core_args(func, dtype)
                args[arg] = value if not name.startswith("alias-") else args[name[6:]]
                arrays = [v for v in args.values() if isinstance(v, np.ndarray)]
                before = _snapshot(*arrays)
                failures.append(_rejects(lambda: fn(**args), f"{func} {arg}={name}"))
                if not _unchanged(arrays, before):
                    failures.append(f"{func} {arg}={name}: an argument was modified")
        for axis in (2, -1, 2 ** 63 - 1, -(2 ** 63), 2 ** 64, 2 ** 70, 1.5, "1", None):
            args = _core_args(func, dtype)
            args["axis"] = axis
            failures.append(_rejects(lambda: fn(**args), f"{func} axis={axis!r}"))
        if func != "backward":
            for eps in (float("nan"), -1.0, 0.0, -0.0, "1e-5", None, 1e-5j):
                args = _core_args(func, dtype)
                args["eps"] = eps
                failures.append(_rejects(lambda: fn(**args), f"{func} eps={eps!r}"))
        if func == "forward_train":
            for momentum in ("0.1", None, 0.1j, 10 ** 400):
                args = _core_args(func, dtype)
                args["momentum"] = momentum
                failures.append(_rejects(lambda: fn(**args), f"{func} momentum={momentum!r}"))
        else:
            if func == "backward":
                args = _core_args(func, dtype)
                args["training"] = "yes"
                failures.append(_rejects(lambda: fn(**args), "backward training='yes'"))


@pytest.mark.parametrize("func", ["forward_train", "forward_eval"])
def test_core_rejects_non_finite_eps_and_momentum(func):
    """The functional layer rejects eps=inf and momentum=nan/inf ("eps must be positive (and
    finite)"); bnc._core must as well -- not silently normalize with invstd = 0 or write NaN
    into the running statistics."""
    fn = getattr(_core, func)
    cases = [("eps", float("inf"))]
    if func == "forward_train":
        cases += [("momentum", float("nan")), ("momentum", float("inf"))]
    accepted = []
    for arg, value in cases:
        args = _core_args(func)
        args[arg] = value
        arrays = [v for v in args.values() if isinstance(v, np.ndarray)]
        before = _snapshot(*arrays)
        try:
            fn(**args)
        except ValueError:
            assert _unchanged(arrays, before)
            continue
        written = "" if _unchanged(arrays, before) else (
            f" (and wrote out[0] = {args['out'][0]}"
            + (f", running_mean = {args['running_mean']}" if func == "forward_train" else "")
            + ")")
        accepted.append(f"{arg}={value}{written}")
    assert not accepted, (
        f"BUG: bnc._core.{func} accepts {accepted}; bnc.batch_norm_forward rejects these with "
        "ValueError")


def test_core_copy_select_isa_set_num_threads_reject_malformed_arguments(restore_num_threads):
    active = _core.active_isa()
    threads = bnc.get_num_threads()
    failures = []
    try:
        with _collect(failures):
            src, dst = np.arange(12.0), np.zeros(12)
            ro = np.zeros(12)
            ro.flags.writeable = False
            cases = [
                (None, dst), (src, None), ([1.0] * 12, dst), (src, [0.0] * 12), ("abc", dst),
                (src, "abc"), (3.0, dst), (src[::-1], dst), (src, np.zeros(24)[::2]),
                (src, ro), (src, np.zeros(11)), (src, np.zeros(13)), (np.zeros((3, 4)).T, dst),
                (src, src), (src[:8], src[4:]),
            ]
            for i, (s, d) in enumerate(cases):
                failures.append(_rejects(lambda: _core.copy(s, d), f"copy case {i}"))
            assert np.array_equal(dst, np.zeros(12)) and np.array_equal(src, np.arange(12.0))
            for isa in (None, 1, 1.5, "foo", "AVX2", " avx2", "avx2 ", "x" * 10_000, "avx2\0",
                        ["avx2"]):
                failures.append(_rejects(lambda: _core.select_isa(isa), f"select_isa({isa!r})"))
                assert _core.active_isa() == active
            for isa in ("avx512", "avx2"):
                if isa not in _core.available_isas():
                    failures.append(_rejects(lambda: _core.select_isa(isa),
                                             f"select_isa({isa!r}) on a CPU without it"))
            for n in (0, -1, -(2 ** 31), 2 ** 31, 2 ** 40, "2", None, 2.5, [2]):
                failures.append(_rejects(lambda: _core.set_num_threads(n),
                                         f"_core.set_num_threads({n!r})"))
                failures.append(_rejects(lambda: bnc.set_num_threads(n),
                                         f"bnc.set_num_threads({n!r})"))
                assert bnc.get_num_threads() == threads
            for n in ("1", None, 1.0):
                failures.append(_rejects(lambda: _core._set_stream_threshold_bytes(n),
                                         f"_set_stream_threshold_bytes({n!r})"))
    finally:
        _core.select_isa(active)
        _core._set_stream_threshold_bytes(-1)


def test_core_copy_rejects_object_arrays():
    """copy moves raw bytes: on object arrays (or structured ones with object fields) it would
    copy PyObject pointers without reference counts (a use-after-free once the source dies).
    The arrays here hold only None (or 0), so a copy that is wrongly accepted does no harm to
    this process."""
    accepted = []
    for src, dst in ((np.full(4, None, object), np.full(4, None, object)),
                     (np.full(4, None, object), np.zeros(4, np.int64)),
                     (np.zeros(4, np.int64), np.full(4, None, object)),
                     (np.zeros(4, [("a", object)]), np.zeros(4, [("a", object)]))):
        try:
            _core.copy(src, dst)
        except (TypeError, ValueError):
            continue
        accepted.append(f"{src.dtype} -> {dst.dtype}")
    assert not accepted, (
        f"BUG: bnc._core.copy accepts object arrays ({accepted}); it copies the PyObject "
        "pointers byte-wise without reference counting: src = np.array([[1.5], None], "
        "dtype=object)[:1]; dst = np.empty(1, object); _core.copy(src, dst); del src; "
        "reuse = [[0] for _ in range(100)]; dst[0] -> shows `reuse` (use after free)")


# == 9. float16 ====================================================================================

F16_CASES = [((16, 5), 1), ((8, 4, 6, 6), 1), ((8, 6, 6, 4), -1), ((4, 3, 130), 1),
             ((4, 6, 9, 9), 1)]


@pytest.mark.parametrize("shape,axis", F16_CASES, ids=_case_id)
def test_float16_functional_against_float64_reference(shape, axis):
    x, dy, w, b, rm, rv = _inputs(shape, axis, F16, seed=90 + shape[axis], offset=0.5)
    c = shape[axis]
    n = x.size // c
    rm1, rv1 = rm.copy(), rv.copy()
    y, m, s = bnc.batch_norm_forward(x, w, b, rm1, rv1, axis=axis)
    assert y.dtype == F16 and m.dtype == F32 and s.dtype == F32
    assert rm1.dtype == F32 and rv1.dtype == F32
    ry, rmean, rinvstd, rrm, rrv = reference.forward(x, w, b, rm, rv, axis=axis)
    np.testing.assert_allclose(y, ry, rtol=1e-3, atol=2e-3, err_msg="y")
    np.testing.assert_allclose(m, rmean, rtol=1e-6, atol=1e-6, err_msg="save_mean")
    np.testing.assert_allclose(s, rinvstd, rtol=1e-6, err_msg="save_invstd")
    np.testing.assert_allclose(rm1, rrm, rtol=1e-6, atol=1e-6, err_msg="running_mean")
    np.testing.assert_allclose(rv1, rrv, rtol=1e-6, err_msg="running_var")

    dx, gw, gb = bnc.batch_norm_backward(dy, x, m, s, w, axis=axis)
    assert dx.dtype == F16 and gw.dtype == F32 and gb.dtype == F32
    rdx, rgw, rgb = reference.backward(dy, x, m, s, w, axis=axis)
    np.testing.assert_allclose(dx, rdx, rtol=1e-3, atol=2e-3 * max(1.0, np.abs(rdx).max()),
                               err_msg="dx")
    np.testing.assert_allclose(gw, rgw, rtol=1e-5, atol=1e-6 * np.sqrt(n), err_msg="grad_w")
    np.testing.assert_allclose(gb, rgb, rtol=1e-5, atol=1e-6 * np.sqrt(n), err_msg="grad_b")

    ye, _, _ = bnc.batch_norm_forward(x, w, b, rm1, rv1, training=False, axis=axis)
    rye = reference.forward(x, w, b, rm1, rv1, training=False, axis=axis)[0]
    assert ye.dtype == F16
    np.testing.assert_allclose(ye, rye, rtol=1e-3, atol=2e-3, err_msg="eval y")


@pytest.mark.parametrize("cls_name,shape,axis",
                         [("BatchNorm2d", (8, 4, 6, 6), 1), ("BatchNorm2d", (8, 6, 6, 4), -1),
                          ("BatchNorm1d", (16, 5), 1), ("BatchNorm1d", (4, 3, 130), 1)],
                         ids=lambda v: _case_id(v) if not isinstance(v, str) else v)
def test_float16_module_parity_with_torch(torch, cls_name, shape, axis):
    """float32 module on float16 input, against torch.nn.BatchNorm* (float32 parameters) on
    the same float16 tensor -- torch supports half input with float parameters on CPU."""
    c = shape[axis]
    x, dy, w, b, _, _ = _inputs(shape, axis, F16, seed=95 + c, offset=0.5)
    m = getattr(bnc, cls_name)(c, axis=axis, momentum=0.3)
    tm = getattr(torch.nn, cls_name)(c, momentum=0.3)
    m.weight[:] = w
    m.bias[:] = b
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(w))
        tm.bias.copy_(torch.from_numpy(b))

    def to_torch(a):
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.movedim(-1, 1) if axis == -1 else t

    def from_torch(t):
        t = t.detach()
        return (t.movedim(1, -1) if axis == -1 else t).contiguous().numpy()

    for step in range(2):
        xs = (x + F16(step)).astype(F16)
        tx = to_torch(xs).requires_grad_(True)
        ty = tm(tx)
        assert ty.dtype == torch.float16, "torch did not keep half output for half input"
        y = m(xs)
        assert y.dtype == F16
        np.testing.assert_allclose(y, from_torch(ty), rtol=1e-3, atol=2e-3, err_msg="y")
        np.testing.assert_allclose(m.running_mean, tm.running_mean.numpy(), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(m.running_var, tm.running_var.numpy(), rtol=1e-5, atol=1e-6)
        assert m.num_batches_tracked == int(tm.num_batches_tracked)
        tm.zero_grad()
        ty.backward(to_torch(dy))
        dx = m.backward(dy)
        assert dx.dtype == F16 and m.grad_weight.dtype == F32 and m.grad_bias.dtype == F32
        tdx = from_torch(tx.grad)
        np.testing.assert_allclose(dx, tdx, rtol=1e-3, atol=2e-3 * max(1.0, np.abs(tdx).max()),
                                   err_msg="dx")
        n = x.size // c
        np.testing.assert_allclose(m.grad_weight, tm.weight.grad.numpy(), rtol=1e-3,
                                   atol=1e-3 * np.sqrt(n), err_msg="grad_weight")
        np.testing.assert_allclose(m.grad_bias, tm.bias.grad.numpy(), rtol=1e-4,
                                   atol=1e-5 * np.sqrt(n), err_msg="grad_bias")
    m.eval()
    tm.eval()
    with torch.no_grad():
        ty = tm(to_torch(x))
    assert ty.dtype == torch.float16
    np.testing.assert_allclose(m(x), from_torch(ty), rtol=1e-3, atol=2e-3, err_msg="eval y")
