"""Forward and backward on every kind of buffer a caller may pass: strided and misaligned inputs
(copied once, never mis-read), out= (written in place and returned), running statistics (updated
in place), inputs (never modified), and empty tensors."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from helpers import DTYPES, TOL, assert_close, check_against_reference, make_inputs, shape_id

import bnc

# -- strided and misaligned inputs -----------------------------------------------------------------


def _strided_views(dtype):
    """(name, non-contiguous view, axis) triples."""
    rng = np.random.default_rng(99)
    base = (2.0 + rng.standard_normal((24, 10, 9, 8))).astype(dtype)
    return [
        ("transposed-NC", np.ascontiguousarray(base[:, :, 0, 0].T).T, 1),  # Fortran order
        ("transposed-NC-view", base[:, :, 0, 0].T[:, :].T, 1),
        ("transposed-NCHW-from-NHWC", base.transpose(0, 3, 1, 2), 1),
        ("NHWC-view-of-NCHW", base.transpose(0, 2, 3, 1), -1),
        ("step-slices", base[::2, 1::3, ::2, 1::2], 1),
        ("negative-strides", base[::-1, :, ::-1, ::-2], 1),
        ("negative-strides-channels-last", base[::-1, ::-1, :, ::-1], -1),
        ("channel-slice", base[:, 2:7], 1),
        ("broadcast-batch", np.broadcast_to(base[:1], (5,) + base.shape[1:]), 1),
    ]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("index", range(9))
def test_non_contiguous_inputs(index, dtype, training):
    name, x, axis = _strided_views(dtype)[index]
    assert not x.flags.c_contiguous, name
    x_before = x.copy()
    c = x.shape[axis]
    rng = np.random.default_rng(index)
    dy_base = rng.standard_normal(x.shape[:-1] + (2 * x.shape[-1],)).astype(dtype)
    dy = dy_base[..., ::-2]  # strided as well
    assert dy.shape == x.shape and not dy.flags.c_contiguous
    wide = rng.uniform(0.5, 2.0, 3 * c).astype(dtype)
    w, b = wide[::3], wide[1::3][::-1]  # strided per-channel inputs are fine too
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)

    y, m, s, dx, gw, gb = check_against_reference(
        x, dy, w, b, rm, rv, training=training, axis=axis
    )
    # The same numbers as for contiguous copies (a strided input is copied, never mis-read).
    xc, dyc, wc, bc = (np.ascontiguousarray(a) for a in (x, dy, w, b))
    rm2, rv2 = np.zeros(c, dtype), np.ones(c, dtype)
    y2, m2, s2 = bnc.batch_norm_forward(xc, wc, bc, rm2, rv2, training=training, axis=axis)
    dx2, gw2, gb2 = bnc.batch_norm_backward(dyc, xc, m2, s2, wc, training=training, axis=axis)
    for got, want in zip((y, m, s, dx, gw, gb), (y2, m2, s2, dx2, gw2, gb2)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(x, x_before)


def test_misaligned_buffers():
    """C-contiguous but not element-aligned arrays (e.g. from a byte buffer) give exact results."""
    for dtype, shape in ((np.float32, (64, 37)), (np.float64, (8, 37, 7, 7)),
                         (np.float64, (32, 3, 100))):
        x, dy, w, b, rm, rv = make_inputs(shape, 1, dtype, seed=8)

        def misaligned(a):
            raw = bytearray(a.nbytes + 1)
            m = np.frombuffer(raw, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
            m[...] = a
            assert not m.flags.aligned and m.flags.c_contiguous and m.flags.writeable
            return m

        # Misaligned inputs are copied once; misaligned arrays written in place are refused
        # (a copy would lose the update), and nothing is modified.
        xm, dym, rmm = misaligned(x), misaligned(dy), misaligned(rm)
        rm_before = rmm.copy()
        with pytest.raises(ValueError,
                           match="running_mean: expected an array aligned to its element size"):
            bnc.batch_norm_forward(x, w, b, rmm, rv.copy())
        np.testing.assert_array_equal(rmm, rm_before)
        with pytest.raises(ValueError, match="out: expected an array aligned"):
            bnc.batch_norm_forward(x, w, b, out=misaligned(np.empty_like(x)))
        with pytest.raises(ValueError, match="expected an array aligned"):
            bnc._core.forward_eval(x, np.empty_like(x), None, None, rmm, rv, 1, 1e-5,
                                   np.empty_like(rm), np.empty_like(rm))
        rm_aligned, rv_aligned = rm.copy(), rv.copy()
        y, sm, si = bnc.batch_norm_forward(xm, w, b, rm_aligned, rv_aligned)
        y2, sm2, si2 = bnc.batch_norm_forward(x, w, b, rm, rv)
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_array_equal(rm_aligned, rm)
        np.testing.assert_array_equal(rv_aligned, rv)
        dx, gw, gb = bnc.batch_norm_backward(dym, xm, sm, si, w)
        dx2, gw2, gb2 = bnc.batch_norm_backward(dy, x, sm2, si2, w)
        np.testing.assert_array_equal(dx, dx2)
        np.testing.assert_array_equal(gw, gw2)
        np.testing.assert_array_equal(gb, gb2)


# -- out= and in-place running statistics ----------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", [((16, 37), 1), ((4, 3, 7, 7), 1), ((4, 7, 7, 5), -1)],
                         ids=shape_id)
def test_out_is_written_in_place_and_returned(case, dtype, training):
    shape, axis = case
    x, dy, w, b, rm, rv = make_inputs(shape, axis, dtype, seed=4)
    out = np.full(shape, np.nan, dtype)
    y, m, s = bnc.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training=training, axis=axis,
                                     out=out)
    assert y is out
    y_alloc, _, _ = bnc.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training=training,
                                           axis=axis)
    np.testing.assert_array_equal(out, y_alloc)

    dout = np.full(shape, np.nan, dtype)
    dx, gw, gb = bnc.batch_norm_backward(dy, x, m, s, w, training=training, axis=axis, out=dout)
    assert dx is dout
    dx_alloc, gw2, gb2 = bnc.batch_norm_backward(dy, x, m, s, w, training=training, axis=axis)
    np.testing.assert_array_equal(dout, dx_alloc)
    np.testing.assert_array_equal(gw, gw2)
    np.testing.assert_array_equal(gb, gb2)


def test_out_may_be_a_view_of_a_bigger_contiguous_buffer():
    x, _, w, b, _, _ = make_inputs((6, 4, 5), 1, np.float32, seed=6)
    buf = np.zeros((2,) + x.shape, np.float32)
    y, _, _ = bnc.batch_norm_forward(x, w, b, out=buf[1])
    assert y is not None and np.shares_memory(y, buf)
    np.testing.assert_array_equal(buf[0], 0)
    np.testing.assert_array_equal(buf[1], bnc.batch_norm_forward(x, w, b)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_running_stats_updated_in_place(dtype):
    x, _, w, b, rm, rv = make_inputs((12, 6, 3, 3), 1, dtype, seed=10)
    rm_obj, rv_obj = rm.copy(), rv.copy()
    rm_id, rv_id = id(rm_obj), id(rv_obj)
    expected_rm, expected_rv = rm.astype(np.float64), rv.astype(np.float64)
    for step in range(3):
        xs = (x + step).astype(dtype)
        bnc.batch_norm_forward(xs, w, b, rm_obj, rv_obj, momentum=0.2)
        _, _, _, expected_rm, expected_rv = reference.forward(
            xs, w, b, expected_rm, expected_rv, training=True, momentum=0.2
        )
    assert id(rm_obj) == rm_id and id(rv_obj) == rv_id
    assert_close(rm_obj, expected_rm, TOL[dtype])
    assert_close(rv_obj, expected_rv, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_eval_leaves_running_stats_unchanged(dtype):
    x, _, w, b, rm, rv = make_inputs((12, 6, 3, 3), 1, dtype, seed=12)
    rm0, rv0 = rm.copy(), rv.copy()
    _, m, s = bnc.batch_norm_forward(x, w, b, rm, rv, training=False, momentum=0.5)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    np.testing.assert_array_equal(m, rm0)  # save_mean is the running mean itself
    assert_close(s, 1 / np.sqrt(rv0.astype(np.float64) + 1e-5), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_inputs_are_not_modified(dtype):
    x, dy, w, b, rm, rv = make_inputs((8, 5, 4), 1, dtype, seed=13)
    copies = [a.copy() for a in (x, dy, w, b)]
    _, m, s = bnc.batch_norm_forward(x, w, b, rm, rv)
    m0, s0 = m.copy(), s.copy()
    bnc.batch_norm_backward(dy, x, m, s, w)
    for a, c in zip((x, dy, w, b, m, s), copies + [m0, s0]):
        np.testing.assert_array_equal(a, c)


# -- empty tensors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", [((0, 3), 1), ((0, 3, 5), 1), ((0, 3, 4, 4), 1),
                                  ((0, 4, 4, 3), -1), ((0, 3, 2, 2, 2), 1)], ids=shape_id)
def test_empty_batch(case, dtype, training):
    shape, axis = case
    c = shape[axis]
    rng = np.random.default_rng(0)
    x = np.empty(shape, dtype)
    w, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(1, 2, c).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv, training=training, axis=axis)
    assert y.shape == shape and y.dtype == dtype and y.size == 0
    assert m.shape == (c,) and s.shape == (c,)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)

    out = np.empty(shape, dtype)
    y2, _, _ = bnc.batch_norm_forward(x, w, b, rm, rv, training=training, axis=axis, out=out)
    assert y2 is out
    np.testing.assert_array_equal(rm, rm0)

    dx, gw, gb = bnc.batch_norm_backward(x, x, rm0, 1 / np.sqrt(rv0 + 1e-5), w,
                                         training=training, axis=axis)
    assert dx.shape == shape and dx.dtype == dtype
    np.testing.assert_array_equal(gw, np.zeros(c))
    np.testing.assert_array_equal(gb, np.zeros(c))


@pytest.mark.parametrize("shape", [(3, 4, 0), (0, 4, 5), (2, 4, 0, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_zero_size_inner_or_batch(shape, training):
    """Empty tensors (also with an empty spatial axis) give empty outputs and touch no buffer."""
    x = np.zeros(shape, np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y, _, _ = bnc.batch_norm_forward(x, running_mean=rm, running_var=rv, training=training)
    assert y.shape == shape
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    dx, gw, gb = bnc.batch_norm_backward(x, x, rm, rv, training=training)
    assert dx.shape == shape
    np.testing.assert_array_equal(gw, 0)
    np.testing.assert_array_equal(gb, 0)
