"""bnc.batch_norm_forward / batch_norm_backward against the float64 reference.

Covers the shape families of the kernels (inner == 1 "row" loops, short and long inner segments,
channel blocks that fit in cache and ones that do not), channels-last and other channel axes,
strided inputs, ``out=``, in-place running statistics, inference mode, empty batches, every ISA
path this CPU has, and bitwise reproducibility across thread counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import reference
from helpers import DTYPES, TOL, assert_close, check_against_reference, make_inputs

import bnc
from bnc import _core

# (shape, axis). The comments name the kernel path the shape exercises (see batch_norm_impl.h).
SHAPES = [
    ((16, 1), 1),  # (N, C), C = 1
    ((16, 3), 1),
    ((9, 37), 1),  # odd C: vector body plus scalar tail
    ((16, 1000), 1),  # many channels, several channel chunks
    ((2, 5), 1),  # smallest batch allowed in training
    ((40000, 3), 1),  # (N, C) too big for one cached block: row blocks merged in order
    ((3, 70000), 1),  # very many channels
    ((8, 5, 13), 1),  # (N, C, L), short segments
    ((4, 37, 100), 1),  # (N, C, L), segments long enough to vectorize along
    ((16, 3, 1, 1), 1),  # 1x1
    ((4, 37, 7, 7), 1),  # 7x7
    ((2, 3, 28, 28), 1),  # 28x28
    ((96, 3, 28, 28), 1),  # 28x28, channel bigger than a cached block
    ((64, 3, 28, 28), 1),  # float32: one channel per cached block, runs under 4 KiB (fused)
    ((256, 8, 7, 7), 1),  # short segments, channel chunk bigger than a cached block
    ((64, 2, 1030), 1),  # long segments with a tail, channel bigger than a cached block
    ((2, 3, 4, 5, 6), 1),  # (N, C, D, H, W)
    ((8, 7, 7, 16), -1),  # channels-last NHWC
    ((4, 5, 37), -1),  # channels-last NLC
    ((16, 1000), -1),  # (N, C) with axis=-1
    ((2, 4, 5, 6, 3), -1),  # channels-last NDHWC
    ((3, 4, 5, 6), 2),  # any other axis works as well
]


def _shape_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + f"-axis{axis}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", SHAPES, ids=_shape_id)
def test_matches_reference(case, dtype, training):
    shape, axis = case
    x, dy, w, b, rm, rv = make_inputs(shape, axis, dtype, seed=len(shape) + shape[axis])
    check_against_reference(x, dy, w, b, rm, rv, training=training, axis=axis)


@pytest.mark.parametrize("affine", ["none", "weight-only", "bias-only"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    "case", [((16, 37), 1), ((4, 3, 7, 7), 1), ((4, 7, 7, 5), -1)], ids=_shape_id
)
def test_optional_weight_and_bias(case, dtype, training, affine):
    shape, axis = case
    x, dy, w, b, rm, rv = make_inputs(shape, axis, dtype, seed=11)
    w = w if affine == "weight-only" else None
    b = b if affine == "bias-only" else None
    check_against_reference(x, dy, w, b, rm, rv, training=training, axis=axis)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", [((32, 5), 1), ((4, 6, 7, 7), 1), ((4, 7, 7, 6), -1)],
                         ids=_shape_id)
def test_training_without_running_stats(case, dtype):
    shape, axis = case
    x, dy, w, b, _, _ = make_inputs(shape, axis, dtype, seed=5)
    check_against_reference(x, dy, w, b, None, None, training=True, axis=axis)


@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_momentum_and_eps(momentum, eps):
    x, dy, w, b, rm, rv = make_inputs((8, 6, 5), 1, np.float64, seed=21)
    check_against_reference(x, dy, w, b, rm, rv, training=True, axis=1, momentum=momentum, eps=eps)
    check_against_reference(x, dy, w, b, rm, rv, training=False, axis=1, eps=eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_data_far_from_zero(dtype):
    """The statistics stay accurate when the mean is 1e4 standard deviations from zero."""
    x, dy, w, b, rm, rv = make_inputs((64, 8, 5, 5), 1, dtype, seed=3, offset=0.0)
    x = (1e4 + x / 2).astype(dtype)
    check_against_reference(x, dy, w, b, rm, rv, training=True, axis=1)


def test_constant_channel():
    """A channel with zero variance normalizes to the bias (invstd = 1/sqrt(eps))."""
    x = np.full((6, 2, 3), 7.0)
    x[:, 1] = np.arange(18.0).reshape(6, 3)
    y, m, s = bnc.batch_norm_forward(x, None, np.array([0.25, 0.0]))
    np.testing.assert_allclose(y[:, 0], 0.25, atol=1e-12)
    assert m[0] == 7.0
    np.testing.assert_allclose(s[0], 1 / np.sqrt(1e-5), rtol=1e-14)


def test_float16_input():
    """float16 input takes float32 per-channel arrays; results match to half precision."""
    x, dy, w, b, rm, rv = make_inputs((8, 4, 6, 6), 1, np.float16, seed=2)
    w, b, rm, rv = (a.astype(np.float32) for a in (w, b, rm, rv))
    rm0, rv0 = rm.copy(), rv.copy()
    y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv)
    assert y.dtype == np.float16 and m.dtype == np.float32 and s.dtype == np.float32
    ry, rmean, rinvstd, rrm, rrv = reference.forward(x, w, b, rm0, rv0)
    assert_close(y, ry, 5e-3, scale=1.0)
    assert_close(m, rmean, 1e-6)
    assert_close(s, rinvstd, 1e-5)
    assert_close(rm, rrm, 1e-6)
    assert_close(rv, rrv, 1e-5)
    dx, gw, gb = bnc.batch_norm_backward(dy, x, m, s, w)
    assert dx.dtype == np.float16 and gw.dtype == np.float32
    rdx, rgw, rgb = reference.backward(dy, x, rmean, rinvstd, w)
    assert_close(dx, rdx, 5e-3, scale=float(np.abs(rdx).max()))
    assert_close(gw, rgw, 1e-5, scale=np.sqrt(x.size / 4))
    assert_close(gb, rgb, 1e-5, scale=np.sqrt(x.size / 4))


# -- strided inputs --------------------------------------------------------------------------------


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
        with pytest.raises(ValueError, match="running_mean: expected an aligned array"):
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
                         ids=_shape_id)
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


# -- empty batches ---------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", [((0, 3), 1), ((0, 3, 5), 1), ((0, 3, 4, 4), 1),
                                  ((0, 4, 4, 3), -1), ((0, 3, 2, 2, 2), 1)], ids=_shape_id)
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


# -- bnc._core called directly ---------------------------------------------------------------------


def test_core_direct_call_matches_functional():
    x, dy, w, b, rm, rv = make_inputs((6, 5, 4), 1, np.float64, seed=14)
    out = np.empty_like(x)
    sm, si = np.empty(5), np.empty(5)
    rm1, rv1 = rm.copy(), rv.copy()
    assert _core.forward_train(x, out, w, b, rm1, rv1, 1, 1e-5, 0.1, sm, si) == 0
    rm2, rv2 = rm.copy(), rv.copy()
    y, m, s = bnc.batch_norm_forward(x, w, b, rm2, rv2)
    for got, want in ((out, y), (sm, m), (si, s), (rm1, rm2), (rv1, rv2)):
        np.testing.assert_array_equal(got, want)
    _core.forward_eval(x, out, w, b, rm, rv, 1, 1e-5, sm, si)
    np.testing.assert_array_equal(out, bnc.batch_norm_forward(x, w, b, rm, rv, training=False)[0])
    dx, gw, gb = np.empty_like(x), np.empty(5), np.empty(5)
    _core.backward(dy, x, dx, m, s, w, 1, True, gw, gb)
    for got, want in zip((dx, gw, gb), bnc.batch_norm_backward(dy, x, m, s, w)):
        np.testing.assert_array_equal(got, want)


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


# -- every ISA path --------------------------------------------------------------------------------

ISA_CASES = [((33, 37), 1), ((4, 5, 7, 7), 1), ((3, 3, 100), 1), ((4, 7, 7, 19), -1)]

_ISA_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import bnc
    assert bnc.config()["isa"] == sys.argv[1], bnc.config()
    rng = np.random.default_rng(0)
    out = {}
    for i, (shape, axis) in enumerate(json.loads(sys.argv[3])):
        shape = tuple(shape)
        for dtype in (np.float32, np.float64):
            c = shape[axis]
            x = (3 + 2 * rng.standard_normal(shape)).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            w = rng.uniform(0.5, 2, c).astype(dtype)
            b = rng.standard_normal(c).astype(dtype)
            rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
            y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv, axis=axis)
            dx, gw, gb = bnc.batch_norm_backward(dy, x, m, s, w, axis=axis)
            ye, me, se = bnc.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis)
            dxe, gwe, gbe = bnc.batch_norm_backward(dy, x, me, se, w, training=False, axis=axis)
            arrays = dict(x=x, dy=dy, w=w, b=b, y=y, dx=dx, gw=gw, gb=gb, rm=rm, rv=rv,
                          ye=ye, dxe=dxe, gwe=gwe, gbe=gbe)
            for name, a in arrays.items():
                out[f"{i}-{np.dtype(dtype).name}-{name}"] = a
    np.savez(sys.argv[2], **out)
    """
)


@pytest.mark.parametrize("isa", bnc.config()["isa_available"])
def test_every_isa_path_matches_reference(isa, tmp_path):
    """Runs forward and backward in a fresh interpreter with BNC_FORCE_ISA=isa."""
    script = tmp_path / "isa_check.py"
    script.write_text(_ISA_SCRIPT)
    result_file = tmp_path / "result.npz"
    env = dict(os.environ, BNC_FORCE_ISA=isa)
    proc = subprocess.run(
        [sys.executable, str(script), isa, str(result_file), json.dumps(ISA_CASES)],
        env=env, capture_output=True, text=True, timeout=120,
        cwd=tmp_path,  # not the repository root, whose bnc/ would shadow the installed package
    )
    assert proc.returncode == 0, proc.stderr
    with np.load(result_file) as data:
        results = dict(data)
    for i, (shape, axis) in enumerate(ISA_CASES):
        for dtype in DTYPES:
            key = f"{i}-{np.dtype(dtype).name}-"
            r = {k[len(key):]: v for k, v in results.items() if k.startswith(key)}
            tol = TOL[dtype]
            x, dy, w, b = r["x"], r["dy"], r["w"], r["b"]
            assert x.dtype == dtype
            c = shape[axis]
            n = x.size // c
            ry, rmean, rinvstd, rrm, rrv = reference.forward(
                x, w, b, np.zeros(c), np.ones(c), axis=axis
            )
            rdx, rgw, rgb = reference.backward(dy, x, rmean, rinvstd, w, axis=axis)
            assert_close(r["y"], ry, tol, what=f"{isa} y")
            assert_close(r["rm"], rrm, tol, what=f"{isa} running_mean")
            assert_close(r["rv"], rrv, tol, what=f"{isa} running_var")
            assert_close(r["dx"], rdx, tol, scale=float(np.abs(rdx).max()), what=f"{isa} dx")
            assert_close(r["gw"], rgw, tol, scale=np.sqrt(n), what=f"{isa} grad_weight")
            assert_close(r["gb"], rgb, tol, scale=np.sqrt(n), what=f"{isa} grad_bias")
            rye, rme, rse, _, _ = reference.forward(
                x, w, b, r["rm"], r["rv"], training=False, axis=axis
            )
            rdxe, rgwe, rgbe = reference.backward(dy, x, rme, rse, w, training=False, axis=axis)
            assert_close(r["ye"], rye, tol, what=f"{isa} eval y")
            assert_close(r["dxe"], rdxe, tol, scale=float(np.abs(rdxe).max()),
                         what=f"{isa} eval dx")
            assert_close(r["gwe"], rgwe, tol, scale=np.sqrt(n),
                         what=f"{isa} eval grad_weight")
            assert_close(r["gbe"], rgbe, tol, scale=np.sqrt(n), what=f"{isa} eval grad_bias")


# -- threads ---------------------------------------------------------------------------------------


def test_num_threads_roundtrip(restore_num_threads):
    for n in (1, 2, 3, 7, 1):
        bnc.set_num_threads(n)
        assert bnc.get_num_threads() == n
        assert bnc.config()["num_threads"] == n
    assert isinstance(bnc.get_num_threads(), int)


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



def test_concurrent_calls_from_python_threads():
    """The kernels release the GIL: concurrent calls from several Python threads (each starting
    its own OpenMP team) give the same results as sequential calls."""
    cases = [((64, 32, 14, 14), 1, np.float32), ((5000, 40), 1, np.float64),
             ((16, 14, 14, 64), -1, np.float32), ((8, 3, 100), 1, np.float64)] * 3

    def run(i):
        shape, axis, dtype = cases[i]
        x, dy, w, b, rm, rv = make_inputs(shape, axis, dtype, seed=i)
        y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv, axis=axis)
        dx, gw, gb = bnc.batch_norm_backward(dy, x, m, s, w, axis=axis)
        ye, _, _ = bnc.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis)
        return y, m, s, rm, rv, dx, gw, gb, ye

    sequential = [run(i) for i in range(len(cases))]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, range(len(cases))))
    for i, (a, b) in enumerate(zip(sequential, concurrent)):
        for u, v in zip(a, b):
            assert np.array_equal(u, v), f"case {i} differs when run concurrently"


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
