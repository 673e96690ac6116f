"""Split-phase BatchNorm (batch_norm_stats, merge_stats, batch_norm_elemt,
batch_norm_backward_reduce, batch_norm_backward_elemt): bitwise identities with the fused forward
and backward, a float64 NumPy reference, merging uneven parts, the SyncBatchNorm composition,
every ISA path and thread count, and validation (messages name the argument; nothing written)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import reference
from helpers import assert_close, make_inputs

import bnc
from bnc import _core

F16, F32, F64 = np.float16, np.float32, np.float64
DTYPES = [F16, F32, F64]
EPS = 1e-5
# Relative tolerances against float64 truth: elementwise outputs (y, dx; scale 1 or max|dx|),
# per-channel sums (scale sqrt(n)), statistics.
TOL = {F16: 1e-2, F32: 1e-5, F64: 1e-10}
SUM_TOL = {F16: 1e-5, F32: 1e-5, F64: 1e-10}
STATS_TOL = {F16: 1e-5, F32: 1e-6, F64: 1e-10}
# Row family (N, C), segment (inner >= 16) and periodic (inner < 16) NC..., channels-last, and
# sizes large enough for several threads and for both kernel families (fused and streamed).
CASES = [((32, 7), 1), ((6, 5, 70), 1), ((9, 6, 11), 1), ((4, 5, 6, 7), -1), ((2, 3, 1, 1), 1),
         ((3000, 96), 1), ((8, 16, 20, 20), 1), ((8, 4, 9000), 1), ((64, 7, 7, 96), -1),
         ((2, 3, 4097), 1)]


def case_id(case):
    return "x".join(map(str, case[0])) + f"-ax{case[1]}"


def dname(dtype):
    return np.dtype(dtype).name


def pdtype(dtype):
    """The per-channel dtype for input of ``dtype`` (float32 for float16)."""
    return F32 if dtype == F16 else dtype


def by_case(cases):
    return pytest.mark.parametrize("shape,axis", cases, ids=[case_id(c) for c in cases])


BY_CASE = by_case(CASES)
BY_DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=dname)


# -- float64 NumPy reference of the split phases ---------------------------------------------------
def _last(a, axis):
    """``a`` as float64 with the channel axis last."""
    return np.moveaxis(np.asarray(a, F64), axis, -1)


def ref_stats(x, axis):
    """(count, mean, m2) from correctly rounded sums (math.fsum)."""
    flat = _last(x, axis).reshape(-1, x.shape[axis])
    n, c = flat.shape
    if n == 0:
        return 0, np.zeros(c), np.zeros(c)
    mean = np.array([math.fsum(flat[:, j]) / n for j in range(c)])
    return n, mean, np.array([math.fsum((flat[:, j] - mean[j]) ** 2) for j in range(c)])


def ref_elemt(x, mean, invstd, w, b, axis):
    w, b = (1.0 if w is None else _last(w, 0)), (0.0 if b is None else _last(b, 0))
    return np.moveaxis((_last(x, axis) - _last(mean, 0)) * _last(invstd, 0) * w + b, -1, axis)


def ref_backward_reduce(dy, x, mean, axis):
    d, xmu = _last(dy, axis), _last(x, axis) - _last(mean, 0)
    over = tuple(range(d.ndim - 1))
    return d.sum(axis=over), (d * xmu).sum(axis=over)


def ref_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count, axis):
    d, xmu = _last(dy, axis), _last(x, axis) - _last(mean, 0)
    s, w = _last(invstd, 0), (1.0 if w is None else _last(w, 0))
    sd, sdx = _last(sum_dy, 0), _last(sum_dy_xmu, 0)
    return np.moveaxis(w * s * (d - sd / count - xmu * s**2 * sdx / count), -1, axis)


def assert_ulps(actual, expected, ulps, what):
    """Same float dtype, at most ``ulps`` units in the last place of ``expected`` apart."""
    assert actual.dtype == expected.dtype, what
    diff = np.abs(actual.astype(F64) - expected.astype(F64))
    spacing = np.spacing(np.abs(expected)).astype(F64)
    worst = float(np.max(diff / spacing, initial=0.0))
    assert np.all(diff <= ulps * spacing), f"{what}: {worst:.2f} ulp apart (allowed {ulps})"


def assert_same_bits(actual: dict, expected: dict, what):
    assert actual.keys() == expected.keys()
    for key in expected:
        a, e = np.asarray(actual[key]), np.asarray(expected[key])
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}: {key}"
        np.testing.assert_array_equal(a, e, err_msg=f"{what}: {key} differs")
        assert a.tobytes() == e.tobytes(), f"{what}: {key} differs in bits (signed zeros?)"


def check_per_channel(c, what, *arrays):
    for a in arrays:
        assert isinstance(a, np.ndarray), f"{what}: got {type(a).__name__}"
        assert a.dtype == F64 and a.shape == (c,), f"{what}: got {a.dtype} {a.shape}"


def stack_stats(parts):
    """merge_stats arguments from a list of (count, mean, m2)."""
    return [p[0] for p in parts], np.stack([p[1] for p in parts]), np.stack([p[2] for p in parts])


def split_outputs(x, dy, w, b, axis):
    """Every split-phase output for one input (float64 statistics, and per-channel-dtype ones)."""
    count, mean, m2 = bnc.batch_norm_stats(x, axis=axis)
    invstd, p = 1.0 / np.sqrt(m2 / count + EPS), pdtype(x.dtype.type)
    sum_dy, sum_dy_xmu = bnc.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
    cut = [0, 1, max(1, x.shape[0] // 3), x.shape[0]]
    merged = bnc.merge_stats(*stack_stats([bnc.batch_norm_stats(x[i:j], axis=axis)
                                           for i, j in zip(cut, cut[1:])]))
    return {"count": np.array(count), "mean": mean, "m2": m2, "merged_count": np.array(merged[0]),
            "merged_mean": merged[1], "merged_m2": merged[2], "sum_dy": sum_dy,
            "sum_dy_xmu": sum_dy_xmu, "y": bnc.batch_norm_elemt(x, mean, invstd, w, b, axis=axis),
            "y_param": bnc.batch_norm_elemt(x, mean.astype(p), invstd.astype(p), w, b, axis=axis),
            "dx": bnc.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count,
                                                axis=axis)}


def check_identities(x, dy, w, b, axis, what):
    """a) stats mean == save_mean; c) elemt == forward's y (float64); d) the reduced sums give
    grad_bias and grad_weight (float32, float64); e) backward_elemt == batch_norm_backward's dx."""
    c, n = x.shape[axis], x.size // x.shape[axis]
    _, mean, _ = bnc.batch_norm_stats(x, axis=axis)
    y, sm, si = bnc.batch_norm_forward(x, w, b, axis=axis)
    got = mean if x.dtype == F64 else mean.astype(F32)
    np.testing.assert_array_equal(got, sm, err_msg=f"{what} a) stats mean vs save_mean")
    ye = bnc.batch_norm_elemt(x, sm, si, w, b, axis=axis)
    assert isinstance(ye, np.ndarray) and ye.flags.c_contiguous, what
    assert ye.dtype == x.dtype and ye.shape == x.shape, what
    if x.dtype == F64:
        np.testing.assert_array_equal(ye, y, err_msg=f"{what} c) elemt vs forward y")
    else:
        assert_close(ye, y, TOL[x.dtype.type], scale=1.0, what=f"{what} elemt vs forward y")
    dx, gw, gb = bnc.batch_norm_backward(dy, x, sm, si, w, training=True, axis=axis)
    sum_dy, sum_dy_xmu = bnc.batch_norm_backward_reduce(dy, x, sm, si, axis=axis)
    check_per_channel(c, f"{what} backward_reduce", sum_dy, sum_dy_xmu)
    wd = (f"{what} d) sum_dy vs grad_bias", f"{what} d) sum_dy_xmu * save_invstd vs grad_weight")
    if x.dtype == F64:
        np.testing.assert_array_equal(sum_dy, gb, err_msg=wd[0])
        np.testing.assert_array_equal(sum_dy_xmu * si, gw, err_msg=wd[1])
    elif x.dtype == F32:
        np.testing.assert_array_equal(sum_dy.astype(F32), gb, err_msg=wd[0])
        np.testing.assert_array_equal((sum_dy_xmu * si.astype(F64)).astype(F32), gw,
                                      err_msg=wd[1])
    else:  # float16: not pinned bitwise
        assert_close(sum_dy, gb, SUM_TOL[F16], scale=np.sqrt(n), what=wd[0])
        assert_close(sum_dy_xmu * si, gw, SUM_TOL[F16], scale=2 * np.sqrt(n), what=wd[1])
    dxe = bnc.batch_norm_backward_elemt(dy, x, sm, si, w, sum_dy, sum_dy_xmu, n, axis=axis)
    assert isinstance(dxe, np.ndarray) and dxe.dtype == x.dtype and dxe.shape == x.shape, what
    np.testing.assert_array_equal(dxe, dx, err_msg=f"{what} e) backward_elemt vs backward dx")


# -- bitwise identities with the fused forward and backward (a-e, k) -------------------------------
@BY_DTYPE
@BY_CASE
def test_stats_match_forward(shape, axis, dtype):
    x, *_ = make_inputs(shape, axis, dtype, seed=1)
    c = shape[axis]
    count, mean, m2 = bnc.batch_norm_stats(x, axis=axis)
    assert type(count) is int and count == x.size // c, f"count: got {count!r}"
    check_per_channel(c, "mean, m2", mean, m2)
    # momentum=1 and zero running statistics: running_var becomes the forward's unbiased variance
    rm, rv = np.zeros(c, pdtype(dtype)), np.zeros(c, pdtype(dtype))
    _, sm, si = bnc.batch_norm_forward(x, None, None, rm, rv, momentum=1.0, axis=axis)
    got = mean if dtype == F64 else mean.astype(F32)
    np.testing.assert_array_equal(got, sm, err_msg="a) stats mean vs forward save_mean (bitwise)")
    invstd, unbiased = 1.0 / np.sqrt(m2 / count + EPS), m2 / (count - 1)
    what = ("b) 1/sqrt(m2/count + eps) vs save_invstd", "b) m2/(count-1) vs running_var")
    if dtype == F64:
        np.testing.assert_allclose(invstd, si, rtol=1e-15, atol=0, err_msg=what[0])
        np.testing.assert_allclose(unbiased, rv, rtol=2e-15, atol=0, err_msg=what[1])
    else:
        assert_ulps(invstd.astype(F32), si, 1, what[0])
        assert_ulps(unbiased.astype(F32), rv, 2, what[1])


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "none"])
@BY_DTYPE
@BY_CASE
def test_phases_match_fused_forward_and_backward(shape, axis, dtype, affine):
    x, dy, w, b, *_ = make_inputs(shape, axis, dtype, seed=2)
    check_identities(x, dy, *((w, b) if affine else (None, None)), axis, "")


# -- merging (f) -----------------------------------------------------------------------------------
@by_case([((16, 6), 1), ((16, 5, 9), 1), ((16, 3, 4, 6), -1)])
def test_merge_uneven_parts(shape, axis):
    x, *_ = make_inputs(shape, axis, F64, seed=4)
    c, bounds = shape[axis], [0, 1, 6, 6, 16]  # parts of 1, 5, 0 and 10 samples
    parts = [bnc.batch_norm_stats(x[i:j], axis=axis) for i, j in zip(bounds, bounds[1:])]
    assert [p[0] for p in parts] == [x[i:j].size // c for i, j in zip(bounds, bounds[1:])]
    assert not parts[2][1].any() and not parts[2][2].any(), "empty part: mean and m2 not zero"
    counts, means, m2s = stack_stats(parts)
    count, mean, m2 = bnc.merge_stats(np.array(counts), means, m2s)
    whole, truth = bnc.batch_norm_stats(x, axis=axis), ref_stats(x, axis)
    assert type(count) is int and count == whole[0] == truth[0] == x.size // c
    check_per_channel(c, "merged mean, m2", mean, m2)
    for name, got, want in (("mean", mean, whole[1]), ("m2", m2, whole[2]),
                            ("mean vs ref", mean, truth[1]), ("m2 vs ref", m2, truth[2])):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, err_msg=f"merged {name}")
    # the list forms, other integer types, and a repeated call give the same bits
    for name, (k, mu, s) in {"sequence": bnc.merge_stats(counts, list(means), list(m2s)),
                             "int32": bnc.merge_stats(np.array(counts, np.int32), means, m2s),
                             "again": bnc.merge_stats(np.array(counts), means, m2s)}.items():
        assert k == count, name
        assert_same_bits({"mean": mu, "m2": s}, {"mean": mean, "m2": m2}, f"merge_stats {name}")
    k, mu, s = bnc.merge_stats(counts[::-1], means[::-1], m2s[::-1])
    np.testing.assert_allclose([k, *mu, *s], [count, *mean, *m2], rtol=1e-12, err_msg="reversed")


def test_merge_known_values_and_skipped_rows():
    """counts 2 and 3 with means 1 and 2: mean 1.6, m2 = 0.5 + 1 + 1**2 * 2 * 3 / 5 = 2.7. A row
    of count 0 is skipped: whatever it holds (NaN, Inf) does not reach the result."""
    means = np.array([[1.0, -4.0], [np.nan, np.nan], [2.0, -4.0]])
    m2s = np.array([[0.5, 0.0], [np.nan, np.inf], [1.0, 2.0]])
    count, mean, m2 = bnc.merge_stats([2, 0, 3], means, m2s)
    assert type(count) is int and count == 5
    np.testing.assert_allclose(np.stack([mean, m2]), [[1.6, -4.0], [2.7, 2.0]], rtol=1e-15)
    for rows in ([0, 2], [1, 0, 2], [0, 2, 1]):
        k, mu, s = bnc.merge_stats(np.array([2, 0, 3])[rows], means[rows], m2s[rows])
        assert k == 5
        assert_same_bits({"mean": mu, "m2": s}, {"mean": mean, "m2": m2}, f"rows {rows}")
    k, mu, s = bnc.merge_stats([0, 0], np.full((2, 3), 5.0), np.full((2, 3), 7.0))  # all empty
    assert type(k) is int and k == 0
    assert_same_bits({"mean": mu, "m2": s}, {"mean": np.zeros(3), "m2": np.zeros(3)}, "all zero")
    # counts beyond 32 bits stay exact
    k, mu, s = bnc.merge_stats([2**40, 3 * 2**40], np.array([[0.0], [4.0]]), np.zeros((2, 1)))
    assert type(k) is int and k == 2**42
    np.testing.assert_allclose([mu[0], s[0]], [3.0, 16.0 * 3 * 2**38], rtol=1e-15)


@BY_DTYPE
def test_stats_of_empty_and_single_sample_batches(dtype):
    """Count 0: zero mean and m2 (a rank without samples: empty y, dx; zero sums); count 1."""
    zeros = {"mean": np.zeros(3), "m2": np.zeros(3)}
    for shape, axis in (((0, 3), 1), ((2, 3, 0), 1), ((0, 2, 2, 3), -1)):
        x, w = np.zeros(shape, dtype), np.ones(3, pdtype(dtype))
        count, mean, m2 = bnc.batch_norm_stats(x, axis=axis)
        assert type(count) is int and count == 0, shape
        assert_same_bits({"mean": mean, "m2": m2}, zeros, f"empty {shape}")
        assert bnc.batch_norm_elemt(x, mean, mean + 1, w, None, axis=axis).shape == shape
        sums = bnc.batch_norm_backward_reduce(x, x, mean, mean + 1, axis=axis)
        assert_same_bits(dict(zip(zeros, sums)), zeros, f"backward_reduce, empty {shape}")
        dx = bnc.batch_norm_backward_elemt(x, x, mean, mean + 1, w, *sums, 10, axis=axis)
        assert dx.shape == shape and dx.dtype == dtype
    x = (3.0 + np.random.default_rng(12).standard_normal((1, 3, 1))).astype(dtype)
    for xs in (x[:, :, 0], x):
        count, mean, m2 = bnc.batch_norm_stats(xs, axis=1)
        assert count == 1
        np.testing.assert_array_equal(mean, x.reshape(3).astype(F64), err_msg="count 1: mean")
        np.testing.assert_array_equal(m2, np.zeros(3), err_msg="count 1: m2")


# -- against the float64 reference (g); mean/invstd/sums given as float64 or per-channel dtype -----
@pytest.mark.parametrize("dtype,stat_dtype", [(F16, F64), (F16, F32), (F32, F64), (F32, F32),
                                              (F64, F64)], ids=lambda d: dname(d))
@BY_CASE
def test_against_reference(shape, axis, dtype, stat_dtype):
    x, dy, w, b, *_ = make_inputs(shape, axis, dtype, seed=5)
    (count, mean, m2), (n, rmean, rm2) = bnc.batch_norm_stats(x, axis=axis), ref_stats(x, axis)
    assert count == n == x.size // shape[axis]
    std = float(np.sqrt(rm2.max() / n))  # assert_close takes a scalar scale
    assert_close(mean, rmean, STATS_TOL[dtype], scale=std, what="stats mean")
    assert_close(m2, rm2, STATS_TOL[dtype], scale=0.0, what="stats m2")
    mean_in, invstd_in = mean.astype(stat_dtype), (1.0 / np.sqrt(m2 / n + EPS)).astype(stat_dtype)
    y = bnc.batch_norm_elemt(x, mean_in, invstd_in, w, b, axis=axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, ref_elemt(x, mean_in, invstd_in, w, b, axis), TOL[dtype], what="elemt y")
    sum_dy, sum_dy_xmu = bnc.batch_norm_backward_reduce(dy, x, mean_in, invstd_in, axis=axis)
    rsd, rsdx = ref_backward_reduce(dy, x, mean_in, axis)
    assert_close(sum_dy, rsd, SUM_TOL[dtype], scale=np.sqrt(n), what="sum_dy")
    assert_close(sum_dy_xmu, rsdx, SUM_TOL[dtype], scale=np.sqrt(n) * max(1.0, std),
                 what="sum_dy_xmu")
    sums = (sum_dy.astype(stat_dtype), sum_dy_xmu.astype(stat_dtype))
    dx = bnc.batch_norm_backward_elemt(dy, x, mean_in, invstd_in, w, *sums, n, axis=axis)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    rdx = ref_backward_elemt(dy, x, mean_in, invstd_in, w, *sums, n, axis)
    assert_close(dx, rdx, TOL[dtype], scale=max(1.0, float(np.abs(rdx).max())), what="dx")


@pytest.mark.parametrize("dtype", [F32, F64], ids=dname)
@by_case([((64, 8, 25), 1), ((3000, 96), 1), ((16, 5, 5, 8), -1), ((8, 4, 9000), 1)])
def test_stats_accuracy_far_from_zero(shape, axis, dtype):
    """Mean 1e4 standard deviations from zero: mean and variance stay accurate."""
    x, tol = (1e4 + np.random.default_rng(6).standard_normal(shape)).astype(dtype), STATS_TOL[dtype]
    (count, mean, m2), (rcount, rmean, rm2) = bnc.batch_norm_stats(x, axis=axis), ref_stats(x, axis)
    np.testing.assert_allclose(mean, rmean, rtol=tol, atol=0, err_msg="mean, 1e4 std from zero")
    np.testing.assert_allclose(m2 / count, rm2 / rcount, rtol=tol, err_msg="var, 1e4 std from 0")


# -- SyncBatchNorm composition (h) -----------------------------------------------------------------
@BY_DTYPE
@by_case([((8, 5, 33), 1), ((7, 4, 4, 6), -1), ((3000, 96), 1), ((9, 6, 11), 1)])
def test_sync_batch_norm_composition(shape, axis, dtype):
    x, dy, w, b, *_ = make_inputs(shape, axis, dtype, seed=7)
    n, cut = x.size // shape[axis], shape[0] // 3 + 1
    ranks = [slice(0, cut), slice(cut, None)]  # two uneven "ranks"
    count, mean, m2 = bnc.merge_stats(*stack_stats([bnc.batch_norm_stats(x[r], axis=axis)
                                                    for r in ranks]))
    invstd = 1.0 / np.sqrt(m2 / count + EPS)
    y = np.concatenate([bnc.batch_norm_elemt(x[r], mean, invstd, w, b, axis=axis) for r in ranks])
    yf, sm, si = bnc.batch_norm_forward(x, w, b, axis=axis)
    assert y.dtype == x.dtype and count == n
    assert_close(y, yf, TOL[dtype], scale=1.0, what="sync y vs forward y")
    sums = [bnc.batch_norm_backward_reduce(dy[r], x[r], mean, invstd, axis=axis) for r in ranks]
    sum_dy, sum_dy_xmu = sums[0][0] + sums[1][0], sums[0][1] + sums[1][1]
    dx = np.concatenate([bnc.batch_norm_backward_elemt(dy[r], x[r], mean, invstd, w, sum_dy,
                                                       sum_dy_xmu, count, axis=axis)
                         for r in ranks])
    dxf, gw, gb = bnc.batch_norm_backward(dy, x, sm, si, w, axis=axis)
    scale = max(1.0, float(np.abs(dxf.astype(F64)).max()))
    assert dx.dtype == x.dtype
    assert_close(dx, dxf, TOL[dtype], scale=scale, what="sync dx vs backward dx")
    assert_close(sum_dy, gb, SUM_TOL[dtype], scale=np.sqrt(n), what="sync sum_dy vs grad_bias")
    assert_close(sum_dy_xmu * invstd, gw, SUM_TOL[dtype], scale=np.sqrt(n),
                 what="sync sum_dy_xmu * invstd vs grad_weight")
    assert_close(dx, reference.backward(dy, x, mean, invstd, w, axis=axis)[0], TOL[dtype],
                 scale=scale, what="sync dx vs float64 reference")


@BY_DTYPE
def test_strided_inputs_give_the_bits_of_a_contiguous_copy(dtype):
    bx, bdy, w, b, *_ = make_inputs((6, 4, 14), 1, dtype, seed=10)
    for x, dy, axis in ((bx[:, :, ::2], bdy[:, :, ::2], 1),
                        (bx.transpose(0, 2, 1), bdy.transpose(0, 2, 1), -1)):
        assert not x.flags.c_contiguous
        contiguous = split_outputs(np.ascontiguousarray(x), np.ascontiguousarray(dy), w, b, axis)
        assert_same_bits(split_outputs(x, dy, w, b, axis), contiguous, f"strided axis={axis}")


# -- every ISA path, thread counts (i) -------------------------------------------------------------
def _on_isa(isa, threads, fn):
    """fn() with ``isa`` selected and ``threads`` threads; the ISA is restored afterwards."""
    previous = _core.active_isa()
    try:
        _core.select_isa(isa)
        bnc.set_num_threads(threads)
        return fn()
    finally:
        _core.select_isa(previous)


@pytest.mark.parametrize("isa", _core.available_isas())
def test_every_isa_path_and_thread_count(isa, restore_num_threads):
    """a), c), d), e) on this ISA path with 1 and 2 threads; all outputs the same bits for 1 and 2
    threads, and the same bits as on the first ISA path (as the golden digests require)."""
    base = _core.available_isas()[0]
    for dtype in DTYPES:
        for shape, axis in [CASES[i] for i in (2, 5, 7, 8)]:  # periodic, row, segment, NHWC
            x, dy, w, b, *_ = make_inputs(shape, axis, dtype, seed=9)
            what = f"isa={isa} {dname(dtype)} {case_id((shape, axis))}"
            for threads in (1, 2):
                for wb in ((w, b), (None, None)):
                    _on_isa(isa, threads, lambda: check_identities(
                        x, dy, *wb, axis, f"{what} threads={threads} affine={wb[0] is w}:"))
            one, two, first = (_on_isa(i, t, lambda: split_outputs(x, dy, w, b, axis))
                               for i, t in ((isa, 1), (isa, 2), (base, 2)))
            assert_same_bits(two, one, f"{what}: 2 threads vs 1")
            assert_same_bits(two, first, f"{what}: vs the {base} path")


# -- validation (j) --------------------------------------------------------------------------------
def _args(dtype=F32):
    """Valid arguments for every function: x (4, 3, 5), channel axis 1, out= filled with 7."""
    rng, p = np.random.default_rng(8), pdtype(dtype)
    x = rng.standard_normal((4, 3, 5)).astype(dtype)
    return dict(x=x, dy=rng.standard_normal(x.shape).astype(dtype), mean=np.zeros(3),
                invstd=np.ones(3), weight=np.ones(3, p), bias=np.zeros(3, p), sum_dy=np.zeros(3),
                sum_dy_xmu=np.zeros(3), count=20, axis=1, out=np.full(x.shape, 7, dtype))


CALLS = {
    "stats": lambda a: bnc.batch_norm_stats(a["x"], axis=a["axis"]),
    "elemt": lambda a: bnc.batch_norm_elemt(a["x"], a["mean"], a["invstd"], a["weight"],
                                            a["bias"], axis=a["axis"], out=a["out"]),
    "reduce": lambda a: bnc.batch_norm_backward_reduce(a["dy"], a["x"], a["mean"], a["invstd"],
                                                       axis=a["axis"]),
    "belemt": lambda a: bnc.batch_norm_backward_elemt(
        a["dy"], a["x"], a["mean"], a["invstd"], a["weight"], a["sum_dy"], a["sum_dy_xmu"],
        a["count"], axis=a["axis"], out=a["out"]),
}
ALL, PC = tuple(CALLS), ("elemt", "reduce", "belemt")
OUT, DY, BE = ("elemt", "belemt"), ("reduce", "belemt"), ("belemt",)
TE, VE, z = TypeError, ValueError, np.zeros
# (functions, x dtype, label, replacements (dict, or function of the args), exception, names)
BAD = [
    (ALL, F32, "x int32", lambda a: {"x": a["x"].astype(np.int32), "dy": a["dy"].astype(np.int32)},
     TE, "x|dy"),
    (ALL, F32, "x 1-D", lambda a: {"x": a["x"].ravel(), "dy": a["dy"].ravel()}, VE, "x|dy"),
    (ALL, F32, "x list", lambda a: {"x": a["x"].tolist()}, TE, "x"),
    (ALL, F32, "axis 3", {"axis": 3}, VE, "axis"),
    (ALL, F32, "axis -4", {"axis": -4}, VE, "axis"),
    (ALL, F32, "axis float", {"axis": 1.0}, TE, "axis"),
    (ALL, F32, "axis str", {"axis": "1"}, TE, "axis"),
    (PC, F32, "mean float16", {"mean": z(3, F16)}, TE, "mean"),
    (PC, F64, "mean float32 for float64 x", {"mean": z(3, F32)}, TE, "mean"),
    (PC, F32, "mean (C+1,)", {"mean": z(4)}, VE, "mean"),
    (PC, F32, "mean None", {"mean": None}, TE, "mean"),
    (PC, F32, "invstd float16", {"invstd": z(3, F16)}, TE, "invstd"),
    (PC, F32, "invstd (C+1,)", {"invstd": z(4)}, VE, "invstd"),
    (OUT, F32, "weight float64", {"weight": z(3)}, TE, "weight"),
    (OUT, F64, "weight float32 for float64 x", {"weight": z(3, F32)}, TE, "weight"),
    (OUT, F16, "weight float16 for float16 x", {"weight": z(3, F16)}, TE, "weight"),
    (OUT, F32, "weight (C+1,)", {"weight": z(4, F32)}, VE, "weight"),
    (("elemt",), F32, "bias float64", {"bias": z(3)}, TE, "bias"),
    (OUT, F32, "out shape", {"out": z((4, 3, 6), F32)}, VE, "out"),
    (OUT, F32, "out dtype", {"out": z((4, 3, 5))}, TE, "out"),
    (OUT, F32, "out read-only", lambda a: {"out": np.broadcast_to(a["out"], (4, 3, 5))}, VE,
     "out"),
    (OUT, F32, "out strided", {"out": z((4, 3, 10), F32)[:, :, ::2]}, VE, "out"),
    (OUT, F32, "out is x", lambda a: {"out": a["x"]}, VE, "out"),
    (OUT, F32, "out overlaps x",
     lambda a: {"x": a["out"][:3], "dy": a["dy"][:3], "out": a["out"][1:]}, VE, "out"),
    (BE, F32, "out is dy", lambda a: {"out": a["dy"]}, VE, "out"),
    (DY, F32, "dy shape", lambda a: {"dy": a["dy"][:3]}, VE, "dy|x"),
    (DY, F32, "dy dtype", lambda a: {"dy": a["dy"].astype(F64)}, TE, "dy|x"),
    (BE, F32, "sum_dy (C+1,)", {"sum_dy": z(4)}, VE, "sum_dy"),
    (BE, F32, "sum_dy_xmu float16", {"sum_dy_xmu": z(3, F16)}, TE, "sum_dy_xmu"),
    (BE, F32, "count 0", {"count": 0}, VE, "count"),
    (BE, F32, "count -3", {"count": -3}, VE, "count"),
    (BE, F32, "count float", {"count": 20.0}, TE, "count"),
    (BE, F32, "count bool", {"count": True}, TE, "count"),
    (BE, F32, "count None", {"count": None}, TE, "count"),
]
BAD_CASES = [(fn, *rest) for fns, *rest in BAD for fn in fns]


@contextlib.contextmanager
def unchanged(arrays):
    """The arrays hold the same bytes after the block, also when it raises."""
    arrays = [a for a in arrays if isinstance(a, np.ndarray)]
    before = [a.tobytes() for a in arrays]
    try:
        yield
    finally:
        for i, (a, b) in enumerate(zip(arrays, before)):
            assert a.tobytes() == b, f"array argument {i} was modified by a call that raised"


@BY_DTYPE
@pytest.mark.parametrize("fn", ALL)
def test_valid_arguments_are_accepted(fn, dtype):
    """The cases below change one thing in these arguments, which work."""
    a = _args(dtype)
    result = CALLS[fn](a)
    if fn in OUT:  # out= is written and returned as the same object
        assert result is a["out"], "out= was not returned"
        np.testing.assert_array_equal(result, CALLS[fn](dict(a, out=None)))


@pytest.mark.parametrize("fn,dtype,label,change,exc,names", BAD_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in BAD_CASES])
def test_bad_arguments_raise_and_write_nothing(fn, dtype, label, change, exc, names):
    a = _args(dtype)
    a.update(change(a) if callable(change) else change)
    with unchanged(a.values()), pytest.raises(exc, match=f"^({names}):"):
        CALLS[fn](a)


MERGE_BAD = [  # (label, counts, means, m2s, exception, argument names)
    ("ragged means", [2, 3], [z(3), z(4)], [z(3), z(3)], VE, "means"),
    ("ragged m2s", [2, 3], [z(3), z(3)], [z(3), z(4)], VE, "m2s"),
    ("shapes differ", [2, 3], z((2, 3)), z((2, 4)), VE, "means|m2s"),
    ("rows differ", [2, 3], z((2, 3)), z((3, 3)), VE, "means|m2s|counts"),
    ("counts length", [2, 3, 4], z((2, 3)), z((2, 3)), VE, "counts"),
    ("negative count", [2, -1], z((2, 3)), z((2, 3)), VE, "counts"),
    ("means 1-D", [2], z(3), z(3), VE, "means"),
    ("means 3-D", [2], z((1, 3, 1)), z((1, 3, 1)), VE, "means"),
    ("means float32", [2, 3], z((2, 3), F32), z((2, 3)), TE, "means"),
    ("m2s float32", [2, 3], z((2, 3)), z((2, 3), F32), TE, "m2s"),
    ("means list float32", [2, 3], [z(3, F32)] * 2, [z(3)] * 2, TE, "means"),
    ("counts floats", [2.0, 3.0], z((2, 3)), z((2, 3)), TE, "counts"),
    ("counts float array", np.array([2.0, 3.0]), z((2, 3)), z((2, 3)), TE, "counts"),
    ("counts bools", [True, True], z((2, 3)), z((2, 3)), TE, "counts"),
    ("counts bool array", np.array([True, True]), z((2, 3)), z((2, 3)), TE, "counts"),
]


@pytest.mark.parametrize("counts,means,m2s,exc,names", [c[1:] for c in MERGE_BAD],
                         ids=[c[0] for c in MERGE_BAD])
def test_merge_stats_rejects(counts, means, m2s, exc, names):
    arrays = [a for arg in (counts, means, m2s) for a in (arg if isinstance(arg, list) else [arg])]
    with unchanged(arrays), pytest.raises(exc, match=f"^({names}):"):
        bnc.merge_stats(counts, means, m2s)
