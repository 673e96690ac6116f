"""Accuracy of the statistics and outputs where naive summation loses digits.

- the mean 1e5 standard deviations from zero (float32), 1e4 (both dtypes), offset 1e8 (float64);
- magnitudes whose squares overflow float32 (1e18, 1e20) or underflow it (1e-23);
- a channel's pivot (its first element, or the mean of its first rows) far from its mean;
- rows narrower than 64 elements folded 16 at a time into super-rows;
- inference output near and far from zero.

All data is drawn from fixed seeds. Loop families (see csrc/kernels/impl/plan.h): "row"
when the inner size (product of the dimensions after the channel axis) is < 64 -- (N, C),
channels-last, 7x7 -- and "segment" when it is >= 64. Where a test also asserts bitwise identity
across thread counts and row orders, that is the reproducibility of this very data (the general
checks are in test_reproducibility.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import reference
from helpers import (
    DTYPES,
    F16,
    F32,
    F64,
    assert_bitwise,
    case_id,
    check_against_reference,
    make_inputs,
    run_everything,
)

import bnc
from bnc import _core

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
        assert_bitwise(other, results[0], "thread counts or row orders")
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


# -- mean far from zero, huge and tiny magnitudes --------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_data_far_from_zero(dtype):
    """The statistics stay accurate when the mean is 1e4 standard deviations from zero."""
    x, dy, w, b, rm, rv = make_inputs((64, 8, 5, 5), 1, dtype, seed=3, offset=0.0)
    x = (1e4 + x / 2).astype(dtype)
    check_against_reference(x, dy, w, b, rm, rv, training=True, axis=1)


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


@pytest.mark.parametrize("shape,axis", ACCURACY_CASES, ids=case_id)
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


@pytest.mark.parametrize("magnitude,dy_scale", [(1e18, 1.0), (1e20, 1e20)], ids=case_id)
@pytest.mark.parametrize("shape,axis", [((4096, 4), 1), ((16, 4, 16, 16), 1),
                                        ((16, 8, 8, 4), -1), ((64, 4, 7, 7), 1),
                                        ((2, 24, 24, 64), -1)], ids=case_id)
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
                                        ((64, 5, 7, 7), 1)], ids=case_id)
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
                         ids=case_id)
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


@pytest.mark.parametrize("shape,axis", [((4096, 8), 1), ((8, 4, 32, 32), 1),
                                        ((8, 4, 7, 7), 1), ((8, 7, 7, 16), -1),
                                        ((16, 5, 300), 1)], ids=case_id)
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


# -- pivots far from the mean ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype,var_rtol", [(F32, 3e-7), (F64, 1e-13)], ids=case_id)
@pytest.mark.parametrize("shape,axis", [
    ((40000, 48), 1),  # (N, C): one chunk of whole rows, many row blocks
    ((40, 30, 30, 48), -1),  # channels-last
    ((64, 24, 40, 40), 1),  # channels of 400 KB: summed in groups of channels
    ((16, 24, 16, 16), 1),  # small channels: reduced and applied chunk by chunk in cache
    ((16, 32, 32, 32), 1),  # 8 such chunks: streamed, a thread reduces its next while it writes
], ids=case_id)
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
@pytest.mark.parametrize("shape,axis", [((4096, 64), 1), ((32, 16, 16, 64), -1)], ids=case_id)
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


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,dtype", [
    ((256, 16384), np.float16),  # unfused: groups of 8192 channels, 1 or 2 ranges per thread
    ((64, 4096), F32),  # fused chunks
], ids=case_id)
def test_running_statistics_updated_once_when_some_channels_are_summed_again(
        shape, dtype, threads, restore_num_threads):
    """Channels whose pivot lies far out are summed again, and the finalize of their range runs
    twice; other ranges of the same group are finalized once. The running statistics (momentum
    0.5, far from the batch's) must be updated exactly once for every channel."""
    bnc.set_num_threads(threads)
    rng = np.random.default_rng(7)
    n, c = shape
    x = (3 + rng.standard_normal(shape)).astype(dtype)
    far = np.r_[100, 5000:5100, 9000] if c > 9000 else np.r_[100, 3000:3050]
    x[:8, far] += 20  # the first 8 rows: the pivot, > kRepivotStds standard deviations out
    rm = np.full(c, 100.0, F32)
    rv = np.full(c, 50.0, F32)
    bnc.batch_norm_forward(x, None, None, rm, rv, momentum=0.5)
    mean, var, count = exact_stats(x, 1)
    np.testing.assert_allclose(rm, 0.5 * 100.0 + 0.5 * mean, rtol=1e-6, err_msg="running_mean")
    np.testing.assert_allclose(rv, 0.5 * 50.0 + 0.5 * var * count / (count - 1), rtol=1e-6,
                               err_msg="running_var")


# -- narrow rows folded into super-rows ------------------------------------------------------------


FOLD_CASES = [
    ((100003, 3), 1),  # several row blocks; the last ends in a partial 16-row super-row
    ((37, 7), 1),  # one fused task: two super-rows and 5 rows
    ((5, 3), 1),  # fewer rows than one super-row
    ((1001, 3, 5), 1),  # inner 5: a lane is a (channel, position, row of 16) triple
    ((21, 13, 17, 3), -1),  # channels-last, 3 channels
    ((4099, 63), 1),  # the widest folded row
    ((4099, 64), 1),  # the narrowest row that is not folded
]


@pytest.mark.parametrize("dtype,rtol", [(F16, 1e-6), (F32, 1e-6), (F64, 1e-13)], ids=case_id)
@pytest.mark.parametrize("shape,axis", FOLD_CASES, ids=case_id)
def test_narrow_rows_folded_into_super_rows(shape, axis, dtype, rtol, stream_threshold,
                                            restore_num_threads):
    """Rows narrower than 64 elements are reduced 16 rows at a time. Statistics and gradient
    sums match the exact ones; every output is bitwise the same for 1 and 3 threads and both row
    orders; a NaN in the last (partial) super-row of channel 1 spoils channel 1 only."""
    x, dy, w, b, rm, rv = make_inputs(shape, axis, dtype, seed=sum(shape), offset=1.5)
    mean, var, n = exact_stats(x, axis)
    out = _same_bits_for_threads_and_row_orders(
        lambda: run_everything(x, dy, w, b, rm, rv, axis))
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
        spoiled = run_everything(bad, dy, w, b, rm, rv, axis)
    others = [c for c in range(shape[axis]) if c != 1]
    for key in ("y", "dx", "save_mean", "save_invstd", "grad_weight", "grad_bias"):
        a, b_ = spoiled[key], out[key]
        if a.ndim > 1:
            a, b_ = np.take(a, others, axis=axis), np.take(b_, others, axis=axis)
        else:
            a, b_ = a[others], b_[others]
        assert np.array_equal(a, b_), f"{key}: a NaN in channel 1 changed other channels"


# -- inference -------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.5, 3.0, 1e4, -1e6])
@pytest.mark.parametrize("shape,axis", [((64, 16), 1), ((8, 16, 7, 7), 1), ((8, 5, 5, 16), -1)])
def test_eval_accuracy_near_and_far_from_zero(offset, shape, axis):
    """Inference output within a few float32 ulps of the float64 truth, whether the running mean
    is near zero (y = x*scale + offset form) or far from it (split-mean form; PyTorch's form loses
    about offset * 6e-8 there)."""
    rng = np.random.default_rng(3)
    c = shape[axis]
    std = rng.uniform(0.5, 2.0, c)
    running_mean = (offset * std).astype(np.float32)
    running_var = (std**2).astype(np.float32)
    bshape = [1] * len(shape)
    bshape[axis] = c
    x = (running_mean.astype(np.float64).reshape(bshape)
         + std.reshape(bshape) * rng.standard_normal(shape)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    y, _, _ = bnc.batch_norm_forward(x, w, b, running_mean, running_var, training=False, axis=axis)
    invstd = 1 / np.sqrt(running_var.astype(np.float64) + 1e-5)
    exact = ((x.astype(np.float64) - running_mean.reshape(bshape)) * (invstd * w).reshape(bshape)
             + b.reshape(bshape))
    assert np.abs(y - exact).max() <= 2e-6 * (1 + np.abs(exact).max())


@pytest.mark.parametrize("dtype, spread", [(np.float64, 1e105), (np.float64, 1e120),
                                           (np.float64, 1e150), (np.float32, 1e20),
                                           (np.float32, 1e30)])
def test_backward_at_extreme_spreads(dtype, spread):
    """dx of data scaled by s is dx of the unscaled data divided by s (eps is negligible against
    the variance at both scales). The expanded coefficient a * invstd^2 underflowed at spreads of
    1e105 (float64, 2-3 digits lost) and 1e20 (float32)."""
    rng = np.random.default_rng(11)
    base = rng.standard_normal((4096, 3)) + np.array([0.5, -2.0, 0.0])
    dy = rng.standard_normal((4096, 3)).astype(dtype)
    w = np.array([1.0, -0.5, 2.0], dtype)
    x1 = base.astype(dtype)
    xs = (base * spread).astype(dtype)
    _, m1, s1 = bnc.batch_norm_forward(x1, w, eps=1e-30)
    _, ms, ss = bnc.batch_norm_forward(xs, w, eps=1e-30)
    dx1, _, _ = bnc.batch_norm_backward(dy, x1, m1, s1, w)
    dxs, _, _ = bnc.batch_norm_backward(dy, xs, ms, ss, w)
    assert np.isfinite(dxs).all()
    tol = 1e-10 if dtype == np.float64 else 2e-5
    scaled = dxs.astype(np.float64) * spread
    np.testing.assert_allclose(scaled, dx1, rtol=tol, atol=tol * np.abs(dx1).max())


def test_float32_near_the_top_of_the_range():
    """x - mean overflowed: the last value came out -inf (true value -sqrt(3))."""
    x = np.array([[3e38], [3e38], [3e38], [-3e38]], np.float32)
    y, mean, invstd = bnc.batch_norm_forward(x)
    np.testing.assert_allclose(y.ravel(), [1 / np.sqrt(3)] * 3 + [-np.sqrt(3)], rtol=1e-6)
    dy = np.array([[1.0], [0.0], [0.0], [0.0]], np.float32)
    dx, _, _ = bnc.batch_norm_backward(dy, x, mean, invstd)
    assert np.isfinite(dx).all()
    rdx, _, _ = reference.backward(dy, x, mean, invstd, None, training=True, axis=1)
    np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-5 * np.abs(rdx).max())


@pytest.mark.parametrize("scale", [1e153, 1e200, 1e300])
def test_float64_beyond_the_range_of_squares(scale):
    """Sums of squares overflowed from |x| ~ 1e152 (output 0, then NaN): such channels are summed
    again scaled. y is the same as for the unscaled data; where even the variance is beyond the
    float64 range, its running statistics are skipped with the non-finite warning."""
    base = np.random.default_rng(12).standard_normal((4096, 2)) + np.array([0.3, -1.0])
    y1, m1, _ = bnc.batch_norm_forward(base, eps=1e-300)
    rm, rv = np.zeros(2), np.ones(2)
    representable = scale * scale * 4 < 1.7e308
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if not representable else "error")
        ys, ms, _ = bnc.batch_norm_forward(base * scale, None, None, rm, rv, eps=1e-300)
    assert np.isfinite(ys).all()
    np.testing.assert_allclose(ys, y1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ms / scale, m1, rtol=1e-12)
    if not representable:
        assert (rm == 0).all() and (rv == 1).all()


def test_float64_at_the_largest_values():
    x = np.array([[1.5e308], [1.5e308], [1.5e308], [-1.5e308]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the variance itself is beyond float64
        y, _, _ = bnc.batch_norm_forward(x)
    np.testing.assert_allclose(y.ravel(), [1 / np.sqrt(3)] * 3 + [-np.sqrt(3)], rtol=1e-12)
