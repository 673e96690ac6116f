"""Helpers shared by the test modules: inputs, tolerances, a forward + backward check against the
float64 reference, bitwise comparison of results, and the checks of the validation tests (a call
that must raise, and must leave what the caller owns unchanged)."""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
import reference

import bnc

TOL = {np.float32: 1e-5, np.float64: 1e-10}
DTYPES = [np.float32, np.float64]
F16, F32, F64 = np.float16, np.float32, np.float64


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


def shifted_normal(shape, dtype, seed):
    """2 + 1.5 N(0, 1) of ``shape`` in ``dtype``."""
    rng = np.random.default_rng(seed)
    return (2.0 + 1.5 * rng.standard_normal(shape)).astype(dtype)


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


# -- parametrize ids -------------------------------------------------------------------------------


def shape_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + f"-axis{axis}"


def case_id(v):
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    if isinstance(v, type):
        return np.dtype(v).name
    if isinstance(v, int):
        return f"axis{v}"
    return str(v)


# -- every output, compared bit for bit ------------------------------------------------------------


def run_everything(x, dy, w, b, rm, rv, axis, make_out=None):
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


def assert_bitwise(got, want, what):
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


# -- validation: errors raised, nothing the caller owns modified -----------------------------------


@contextlib.contextmanager
def unchanged(*arrays):
    """Asserts that the arrays' contents are the same after the block (NaN compares equal),
    also when the block raises."""
    before = [np.array(a, copy=True) for a in arrays]
    try:
        yield
    finally:
        for i, (a, b) in enumerate(zip(arrays, before)):
            assert np.array_equal(a, b, equal_nan=True), f"argument {i} was modified"


def raises(exc, fragment):
    """pytest.raises with a literal message fragment."""
    return pytest.raises(exc, match=re.escape(fragment))


def module_state(m):
    state = {k: (None if v is None else v.copy()) for k, v in vars(m).items()
             if isinstance(v, np.ndarray) or v is None}
    state["num_batches_tracked"] = m.num_batches_tracked
    state["training"] = m.training
    state["_saved_id"] = id(m._saved)
    return state


@contextlib.contextmanager
def module_unchanged(m):
    """Asserts that the module's parameters, buffers, counters and saved forward are unchanged."""
    weight_obj, rm_obj = m.weight, m.running_mean
    before = module_state(m)
    try:
        yield
    finally:
        _compare_module_state(m, before, weight_obj, rm_obj)


def _compare_module_state(m, before, weight_obj, rm_obj):
    after = module_state(m)
    assert m.weight is weight_obj and m.running_mean is rm_obj
    assert before.keys() == after.keys()
    for key in before:
        b, a = before[key], after[key]
        if isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray) and np.array_equal(a, b, equal_nan=True), key
        else:
            assert a == b, key


def trained(cls, c=3, shape=None, **kwargs):
    """A module after one training step with non-trivial weight and bias."""
    m = cls(c, **kwargs)
    rng = np.random.default_rng(0)
    if m.weight is not None:
        m.weight[:] = rng.uniform(0.5, 2.0, c)
    if m.bias is not None:
        m.bias[:] = rng.standard_normal(c)
    shape = shape or {bnc.BatchNorm1d: (4, c), bnc.BatchNorm2d: (2, c, 2, 2),
                      bnc.BatchNorm3d: (2, c, 2, 2, 2)}[cls]
    m(rng.standard_normal(shape).astype(m.dtype))
    return m


def make_read_only(a):
    a.flags.writeable = False
    return a


BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, object, np.complex64, np.complex128,
              np.longdouble]


# Values accepted as an input array (weight, bias, ...) or an output array: anything else must
# raise TypeError or ValueError.


def malformed(shape, dtype, *, required, output, aliases=(), float16_ok=False):
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


def rejects(fn, what):
    """Calls fn(); returns a description of the failure unless it raised TypeError/ValueError."""
    try:
        fn()
    except (TypeError, ValueError):
        return None
    except Exception as error:  # noqa: BLE001 - any other exception type is the failure
        return f"{what}: raised {type(error).__name__}: {error}"
    return f"{what}: accepted"


@contextlib.contextmanager
def collect_failures(failures):
    """Collects rejects() results (None: rejected as it should be) and fails with the rest."""
    yield
    bad = [f for f in failures if f]
    assert not bad, "not rejected with TypeError/ValueError:\n" + "\n".join(bad)


def snapshot(*arrays):
    return [np.array(a, copy=True) for a in arrays]


def untouched(arrays, before):
    return all(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
               for a, b in zip(arrays, before))
