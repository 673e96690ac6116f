"""Helpers shared by the test modules: inputs, tolerances, and a forward + backward check
against the float64 reference."""

from __future__ import annotations

import numpy as np
import reference

import bnc

TOL = {np.float32: 1e-5, np.float64: 1e-10}
DTYPES = [np.float32, np.float64]


def make_inputs(shape, axis, dtype, seed=0, offset=3.0):
    """x with a mean of a few units, dy, and per-channel weight, bias and running stats (in the
    parameter dtype: float32 for float16 input)."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    p = np.float32 if dtype == np.float16 else dtype
    x = (offset + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(p)
    b = rng.standard_normal(c).astype(p)
    rm = rng.standard_normal(c).astype(p)
    rv = rng.uniform(0.5, 2.0, c).astype(p)
    return x, dy, w, b, rm, rv


def assert_close(actual, expected, tol, scale=1.0, what=""):
    """|actual - expected| <= tol * (|expected| + scale), elementwise."""
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=tol, atol=tol * scale, err_msg=what
    )


def check_against_reference(x, dy, w, b, rm, rv, *, training, axis, momentum=0.1, eps=1e-5):
    """Runs bnc forward + backward and compares every output with the reference."""
    dtype = x.dtype.type
    tol = TOL[dtype]
    c = x.shape[axis]
    n = x.size // c
    rm_in = None if rm is None else rm.copy()
    rv_in = None if rv is None else rv.copy()
    y, save_mean, save_invstd = bnc.batch_norm_forward(
        x, w, b, rm_in, rv_in, training=training, momentum=momentum, eps=eps, axis=axis
    )
    ry, rmean, rinvstd, rrm, rrv = reference.forward(
        x, w, b, rm, rv, training=training, momentum=momentum, eps=eps, axis=axis
    )
    assert y.shape == x.shape and y.dtype == x.dtype
    assert save_mean.shape == (c,) and save_mean.dtype == x.dtype
    assert save_invstd.shape == (c,) and save_invstd.dtype == x.dtype
    assert_close(y, ry, tol, scale=1.0, what="y")
    assert_close(save_mean, rmean, tol, what="save_mean")
    assert_close(save_invstd, rinvstd, tol, what="save_invstd")
    if rm is not None:
        assert_close(rm_in, rrm, tol, what="running_mean")
        assert_close(rv_in, rrv, tol, what="running_var")

    dx, gw, gb = bnc.batch_norm_backward(
        dy, x, save_mean, save_invstd, w, training=training, axis=axis
    )
    # batch_norm_backward is a function of the saved statistics it is given: the reference gets
    # the same ones (float32 statistics of data far from zero differ from the float64 truth by
    # more than the gradient's tolerance, in PyTorch as well).
    rdx, rgw, rgb = reference.backward(
        dy, x, save_mean, save_invstd, w, training=training, axis=axis
    )
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert gw.shape == (c,) and gw.dtype == x.dtype
    assert gb.shape == (c,) and gb.dtype == x.dtype
    assert_close(dx, rdx, tol, scale=max(1.0, float(np.abs(rdx).max(initial=0))), what="dx")
    assert_close(gw, rgw, tol, scale=np.sqrt(n), what="grad_weight")
    assert_close(gb, rgb, tol, scale=np.sqrt(n), what="grad_bias")
    return y, save_mean, save_invstd, dx, gw, gb
