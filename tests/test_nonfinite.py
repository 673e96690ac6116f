"""NaN and Inf input: a channel whose batch statistics are not finite keeps its running
statistics, is counted and reported (a RuntimeWarning), and leaves the other channels bitwise
untouched -- in the functional API, the modules and bnc._core."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import F16, F32, case_id, make_inputs, shifted_normal

import bnc
from bnc import _core

# -- functional ------------------------------------------------------------------------------------


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
@pytest.mark.parametrize("dtype", [F32, F16], ids=case_id)
@pytest.mark.parametrize("shape,axis", NONFINITE_CASES, ids=case_id)
def test_nan_and_inf_channels_leave_other_channels_untouched(shape, axis, dtype, where):
    x, dy, w, b, rm, rv = make_inputs(shape, axis, dtype, seed=41, offset=1.5)
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


# -- modules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [1, -1])
def test_module_with_nan_and_inf_channels(axis):
    shape = (8, 6, 5, 5) if axis == 1 else (8, 5, 5, 6)
    x, dy, _, _, _, _ = make_inputs(shape, axis, F32, seed=42, offset=1.5)
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


def test_non_finite_batch_statistics_are_not_tracked():
    """A channel with NaN/Inf in the batch keeps its running statistics (with a RuntimeWarning);
    the other channels are updated and the batch is counted."""
    m = bnc.BatchNorm1d(3, dtype=np.float64)
    x = shifted_normal((6, 3), np.float64, 0)
    x[2, 1] = np.nan
    with pytest.warns(RuntimeWarning, match="1 of 3 channels are not finite"):
        y = m(x)
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
    assert m.num_batches_tracked == 1
    assert m.running_mean[1] == 0.0 and m.running_var[1] == 1.0
    np.testing.assert_allclose(m.running_mean[[0, 2]], 0.1 * x[:, [0, 2]].mean(0), rtol=1e-12)


def test_non_finite_warning_as_error_leaves_module_consistent():
    """With warnings as errors, the RuntimeWarning for skipped channels is raised after the
    module's state (running statistics, num_batches_tracked, saved tensors) is complete."""
    import warnings

    m = bnc.BatchNorm1d(2)
    x = np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32)
    x[3, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="1 of 2 channels"):
            m(x)
    assert m.num_batches_tracked == 1
    assert m.running_mean[0] == 0 and m.running_var[0] == 1  # skipped channel untouched
    assert m.running_mean[1] != 0  # the other channel updated
    m.backward(np.ones_like(x))  # the forward's saved state is there


# -- bnc._core -------------------------------------------------------------------------------------


def test_core_counts_non_finite_channels():
    """forward_train skips (and counts) channels whose batch statistics are not finite."""
    x = np.ones((4, 3))
    x[:, 0] = [1.0, 2.0, 3.0, 4.0]
    x[1, 1] = np.nan
    x[2, 2] = np.inf
    out, sm, si = np.empty_like(x), np.empty(3), np.empty(3)
    rm, rv = np.zeros(3), np.ones(3)
    assert _core.forward_train(x, out, None, None, rm, rv, 1, 1e-5, 0.5, sm, si) == 2
    np.testing.assert_allclose(rm, [1.25, 0.0, 0.0])
    np.testing.assert_array_equal(rv[1:], [1.0, 1.0])
    with pytest.warns(RuntimeWarning, match="2 of 3 channels are not finite"):
        bnc.batch_norm_forward(x, running_mean=rm, running_var=rv)


def test_warning_as_error_comes_after_the_writes_as_documented():
    """README: under warnings-as-errors the non-finite warning arrives after out= and the finite
    channels' running statistics were written (y is then read from out=)."""
    x = np.random.default_rng(5).standard_normal((8, 2)).astype(np.float32)
    x[3, 1] = np.nan
    out = np.zeros_like(x)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="1 of 2 channels"):
            bnc.batch_norm_forward(x, None, None, rm, rv, out=out)
    assert np.isfinite(out[:, 0]).all() and np.isnan(out[:, 1]).all()
    assert rm[0] != 0.0 and rm[1] == 0.0 and rv[1] == 1.0
