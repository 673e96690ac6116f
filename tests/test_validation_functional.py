"""Every error case: the exception type, a fragment of its message, and that nothing the caller
owns (running statistics, out, num_batches_tracked, weights, inputs) was modified."""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest

import bnc
from bnc import _core


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


MODULE_CASES = [
    (bnc.BatchNorm1d, (4, 3)),
    (bnc.BatchNorm1d, (4, 3, 2)),
    (bnc.BatchNorm2d, (2, 3, 2, 2)),
    (bnc.BatchNorm3d, (2, 3, 2, 2, 2)),
]
MODULE_IDS = ["1d", "1d-3D", "2d", "3d"]


# -- one value per channel -------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    "cls,shape",
    [(bnc.BatchNorm1d, (1, 3)), (bnc.BatchNorm1d, (1, 3, 1)), (bnc.BatchNorm2d, (1, 3, 1, 1)),
     (bnc.BatchNorm3d, (1, 3, 1, 1, 1))],
)
def test_module_one_value_per_channel_when_training(cls, shape, momentum):
    m = trained(cls, momentum=momentum)
    x = np.ones(shape, np.float32)
    with module_unchanged(m), raises(ValueError,
                                     "Expected more than 1 value per channel when training"):
        m(x)
    assert m.num_batches_tracked == 1
    # inference with a single value is fine
    y = m.eval()(x)
    assert y.shape == shape


@pytest.mark.parametrize("shape,axis", [((1, 3), 1), ((1, 1, 1, 3), -1), ((1, 3, 1, 1), 1)])
def test_functional_one_value_per_channel_when_training(shape, axis):
    x = np.ones(shape, np.float64)
    rm, rv, out = np.zeros(3), np.ones(3), np.full(shape, 7.0)
    with unchanged(rm, rv, out), raises(ValueError,
                                        "Expected more than 1 value per channel when training"):
        bnc.batch_norm_forward(x, None, None, rm, rv, axis=axis, out=out)
    bnc.batch_norm_forward(x, None, None, rm, rv, training=False, axis=axis)


# -- input shape, channels, dtype ------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,shape,message",
    [
        (bnc.BatchNorm2d, (2, 3, 4), "expected 4D input (got 3D input)"),
        (bnc.BatchNorm2d, (2, 3, 4, 4, 4), "expected 4D input (got 5D input)"),
        (bnc.BatchNorm1d, (2, 3, 4, 4), "expected 2D or 3D input (got 4D input)"),
        (bnc.BatchNorm3d, (2, 3, 4, 4), "expected 5D input (got 4D input)"),
    ],
)
def test_module_wrong_input_rank(cls, shape, message):
    m = trained(cls)
    with module_unchanged(m), raises(ValueError, message):
        m(np.ones(shape, np.float32))
    m.eval()
    with module_unchanged(m), raises(ValueError, message):
        m(np.ones(shape, np.float32))


@pytest.mark.parametrize("shape", [(3,), ()])
def test_input_with_fewer_than_two_dimensions(shape):
    m = trained(bnc.BatchNorm1d)
    with module_unchanged(m), raises(ValueError, "x: expected at least 2 dimensions"):
        m(np.ones(shape, np.float32))
    with raises(ValueError, "x: expected at least 2 dimensions"):
        bnc.batch_norm_forward(np.ones(shape, np.float32))
    with raises(ValueError, "dy: expected at least 2 dimensions"):
        bnc.batch_norm_backward(np.ones(shape), np.ones(shape), np.zeros(1), np.ones(1))


@pytest.mark.parametrize("cls,shape", MODULE_CASES, ids=MODULE_IDS)
def test_module_wrong_channel_count(cls, shape):
    m = trained(cls)
    bad = (shape[0], 4) + shape[2:]
    with module_unchanged(m), raises(ValueError, "x: expected 3 channels on axis 1, got 4"):
        m(np.ones(bad, np.float32))
    m.eval()
    with module_unchanged(m), raises(ValueError, "x: expected 3 channels on axis 1, got 4"):
        m(np.ones(bad, np.float32))


def test_module_wrong_channel_count_channels_last():
    m = bnc.BatchNorm2d(3, axis=-1)
    with module_unchanged(m), raises(ValueError, "x: expected 3 channels on axis -1, got 5"):
        m(np.ones((2, 4, 4, 5), np.float32))


def test_module_axis_out_of_range():
    m = bnc.BatchNorm2d(3, axis=4)
    with module_unchanged(m), raises(ValueError, "axis: expected an axis of a 4-D input"):
        m(np.ones((2, 3, 4, 4), np.float32))


BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, object, np.complex64, np.complex128,
              np.longdouble]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cls,shape", MODULE_CASES, ids=MODULE_IDS)
def test_module_non_float_input(cls, shape, dtype):
    m = trained(cls)
    x = np.ones(shape, dtype)
    with module_unchanged(m), raises(TypeError, "x: expected dtype float16, float32 or float64"):
        m(x)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_functional_non_float_input(dtype):
    x = np.ones((4, 3), dtype)
    out = np.full((4, 3), 5.0, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with unchanged(out, rm, rv), raises(TypeError, "x: expected dtype float16, float32 or float64"):
        bnc.batch_norm_forward(x, running_mean=rm, running_var=rv, out=out)
    with unchanged(out), raises(TypeError, "dy: expected dtype float16, float32 or float64"):
        bnc.batch_norm_backward(x, x, np.zeros(3), np.ones(3), out=out)
    good = np.ones((4, 3), np.float32)
    with unchanged(out), raises(TypeError, "x: expected dtype float16, float32 or float64"):
        bnc.batch_norm_backward(good, x, rm, rv, out=out)


def test_non_native_byte_order_input():
    x = np.ones((4, 3), ">f4")
    with raises(TypeError, "non-native byte order"):
        bnc.batch_norm_forward(x)
    with raises(TypeError, "non-native byte order"):
        bnc.BatchNorm1d(3)(x)
    with raises(TypeError, "weight: expected dtype float32"):
        bnc.batch_norm_forward(np.ones((4, 3), np.float32), np.ones(3, ">f4"))


@pytest.mark.parametrize("cls,shape", MODULE_CASES, ids=MODULE_IDS)
def test_module_float64_input_into_float32_module(cls, shape):
    m = trained(cls)
    for training in (True, False):
        m.train(training)
        with module_unchanged(m), raises(TypeError,
                                         "x: expected dtype float32 or float16 (the module's "
                                         "dtype), got float64"):
            m(np.ones(shape, np.float64))


def test_module_float32_and_float16_input_into_float64_module():
    m = trained(bnc.BatchNorm1d, dtype=np.float64)
    for dtype in (np.float32, np.float16):
        with module_unchanged(m), raises(TypeError, "x: expected dtype float64 (the module's"):
            m(np.ones((4, 3), dtype))


# -- eps, momentum, axis, constructor arguments ----------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, -1e-5, -1.0, float("nan"), float("inf")])
def test_eps_must_be_positive(eps):
    for cls in (bnc.BatchNorm1d, bnc.BatchNorm2d, bnc.BatchNorm3d):
        with raises(ValueError, "eps must be positive"):
            cls(3, eps=eps)
    x = np.ones((4, 3), np.float32)
    rm, rv, out = np.zeros(3, np.float32), np.ones(3, np.float32), np.zeros((4, 3), np.float32)
    for training in (True, False):
        with unchanged(rm, rv, out), raises(ValueError, "eps must be positive"):
            bnc.batch_norm_forward(x, None, None, rm, rv, training=training, eps=eps, out=out)


def test_eps_and_momentum_types():
    with raises(TypeError, "eps: expected a float, got str"):
        bnc.BatchNorm1d(3, eps="1e-5")
    with raises(TypeError, "eps: expected a float, got NoneType"):
        bnc.batch_norm_forward(np.ones((4, 3)), eps=None)
    with raises(TypeError, "momentum: expected a float, got str"):
        bnc.BatchNorm1d(3, momentum="0.1")
    with raises(ValueError, "momentum: expected a finite float"):
        bnc.BatchNorm2d(3, momentum=float("nan"))
    rm, rv = np.zeros(3), np.ones(3)
    with unchanged(rm, rv), raises(ValueError, "momentum: expected a finite float"):
        bnc.batch_norm_forward(np.ones((4, 3)), None, None, rm, rv, momentum=float("inf"))
    with unchanged(rm, rv), raises(TypeError, "momentum: expected a float, got NoneType"):
        bnc.batch_norm_forward(np.ones((4, 3)), None, None, rm, rv, momentum=None)


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_functional_axis_out_of_range(axis):
    x = np.ones((4, 3))
    with raises(ValueError, "axis: expected an axis of a 2-D input in [-2, 2), got"):
        bnc.batch_norm_forward(x, axis=axis)
    with raises(ValueError, "axis: expected an axis of a 2-D input in [-2, 2), got"):
        bnc.batch_norm_backward(x, x, np.zeros(3), np.ones(3), axis=axis)


@pytest.mark.parametrize("axis", [1.0, "1", None, True])
def test_axis_must_be_an_int(axis):
    with raises(TypeError, "axis: expected an int"):
        bnc.batch_norm_forward(np.ones((4, 3)), axis=axis)
    with raises(TypeError, "axis: expected an int"):
        bnc.BatchNorm1d(3, axis=axis)


@pytest.mark.parametrize(
    "kwargs,exc,fragment",
    [
        (dict(num_features=0), ValueError, "num_features: expected a positive int, got 0"),
        (dict(num_features=-2), ValueError, "num_features: expected a positive int"),
        (dict(num_features=2.5), TypeError, "num_features: expected an int, got float"),
        (dict(num_features=True), TypeError, "num_features: expected an int, got bool"),
        (dict(num_features=3, dtype=np.int32), TypeError, "dtype: expected float32 or float64"),
        (dict(num_features=3, dtype=np.float16), TypeError, "dtype: expected float32 or float64"),
        (dict(num_features=3, dtype="nonsense"), TypeError, "dtype: expected float32 or float64"),
    ],
)
def test_constructor_arguments(kwargs, exc, fragment):
    with raises(exc, fragment):
        bnc.BatchNorm2d(**kwargs)


def test_set_num_threads_arguments(restore_num_threads):
    before = bnc.get_num_threads()
    with raises(ValueError, "n: expected a thread count from 1 to 4096, got 0"):
        bnc.set_num_threads(0)
    with raises(ValueError, "n: expected a thread count from 1 to 4096, got -3"):
        bnc.set_num_threads(-3)
    with raises(TypeError, "n: expected an int, got float"):
        bnc.set_num_threads(2.0)
    with raises(TypeError, "n: expected an int, got bool"):
        bnc.set_num_threads(True)
    with raises(ValueError, "n: expected a thread count from 1 to 4096, got 0"):
        _core.set_num_threads(0)
    with raises(ValueError, "n: expected a thread count from 1 to 4096, got 2147483647"):
        bnc.set_num_threads(2**31 - 1)
    with raises(ValueError, "n: expected a thread count from 1 to 4096, got 5000"):
        _core.set_num_threads(5000)
    assert bnc.get_num_threads() == before


# -- out= ------------------------------------------------------------------------------------------


def _forward_args(dtype=np.float32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 2)).astype(dtype)
    return x, np.ones(3, dtype), np.zeros(3, dtype), np.zeros(3, dtype), np.ones(3, dtype)


OUT_CASES = [
    ("shape", lambda x: np.zeros((4, 3, 3), x.dtype), ValueError,
     "out: expected shape (4, 3, 2), got (4, 3, 3)"),
    ("shape-flat", lambda x: np.zeros(x.size, x.dtype), ValueError, "out: expected shape"),
    ("dtype", lambda x: np.zeros(x.shape, np.float64), TypeError,
     "out: expected dtype float32, got float64"),
    ("dtype-int", lambda x: np.zeros(x.shape, np.int32), TypeError, "out: expected dtype float32"),
    ("byte-order", lambda x: np.zeros(x.shape, ">f4"), TypeError, "out: expected dtype float32"),
    ("strided", lambda x: np.zeros((4, 3, 4), x.dtype)[..., ::2], ValueError,
     "out: expected a C-contiguous array, got a strided one"),
    ("fortran", lambda x: np.zeros(x.shape, x.dtype, order="F"), ValueError,
     "out: expected a C-contiguous array"),
    ("read-only", lambda x: _read_only(np.zeros(x.shape, x.dtype)), ValueError,
     "out: expected a writeable array, got a read-only one"),
    ("list", lambda x: np.zeros(x.shape, x.dtype).tolist(), TypeError,
     "out: expected a numpy.ndarray or None, got list"),
]


def _read_only(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,make,exc,fragment", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_forward_bad_out(name, make, exc, fragment, training):
    x, w, b, rm, rv = _forward_args()
    out = make(x)
    with unchanged(x, w, b, rm, rv, out), raises(exc, fragment):
        bnc.batch_norm_forward(x, w, b, rm, rv, training=training, out=out)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,make,exc,fragment", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_backward_bad_out(name, make, exc, fragment, training):
    x, w, _, rm, rv = _forward_args()
    dy = np.ones_like(x)
    sm, si = rm.copy(), rv.copy()
    out = make(x)
    with unchanged(x, dy, w, sm, si, out), raises(exc, fragment):
        bnc.batch_norm_backward(dy, x, sm, si, w, training=training, out=out)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_out_overlapping_inputs(training):
    x, w, b, rm, rv = _forward_args()
    with unchanged(x, rm, rv), raises(ValueError, "out: expected memory not shared with x"):
        bnc.batch_norm_forward(x, w, b, rm, rv, training=training, out=x)
    # partial overlap: two different C-contiguous views of one buffer
    buf = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    x2, out2 = buf[:4], buf[1:]
    rm2, rv2 = np.zeros(3, np.float32), np.ones(3, np.float32)
    with unchanged(buf, rm2, rv2), raises(ValueError, "out: expected memory not shared with x"):
        bnc.batch_norm_forward(x2, None, None, rm2, rv2, training=training, out=out2)
    dy = np.ones_like(x)
    for alias, name in ((dy, "dy"), (x, "x")):
        with unchanged(x, dy), raises(ValueError, f"out: expected memory not shared with {name}"):
            bnc.batch_norm_backward(dy, x, rm, rv, w, training=training, out=alias)


def test_per_channel_arrays_overlapping_outputs():
    """Running statistics are written in place: they may not alias x or each other."""
    x = np.random.default_rng(2).standard_normal((4, 3))
    rm, rv = np.zeros(3), np.ones(3)
    with unchanged(x, rv), raises(ValueError, "running_mean: expected memory not shared with x"):
        bnc.batch_norm_forward(x, None, None, x[0], rv)
    both = np.ones(3)
    with unchanged(x, both), raises(ValueError, "expected memory not shared with"):
        bnc.batch_norm_forward(x, None, None, both, both)
    w = np.ones(3)
    with unchanged(x, w, rv), raises(ValueError, "expected memory not shared with weight"):
        bnc.batch_norm_forward(x, w, None, w, rv)
    with unchanged(x, rm, rv):
        bnc.batch_norm_forward(x, None, None, rm, rv, training=False)  # inputs in eval: fine


# -- per-channel arrays ----------------------------------------------------------------------------


PER_CHANNEL = ["weight", "bias", "running_mean", "running_var"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", PER_CHANNEL)
@pytest.mark.parametrize(
    "bad,exc,fragment",
    [
        (np.ones(4, np.float32), ValueError, "expected shape (3,), got (4,)"),
        (np.ones(2, np.float32), ValueError, "expected shape (3,), got (2,)"),
        (np.ones((3, 1), np.float32), ValueError, "expected shape (3,), got (3, 1)"),
        (np.ones((), np.float32), ValueError, "expected shape (3,), got ()"),
        (np.ones(3, np.float64), TypeError, "expected dtype float32, got float64"),
        (np.ones(3, np.float16), TypeError, "expected dtype float32, got float16"),
        (np.ones(3, np.int32), TypeError, "expected dtype float32, got int32"),
        (np.ones(3, ">f4"), TypeError, "expected dtype float32, got >f4"),
        ([1.0, 1.0, 1.0], TypeError, "expected a numpy.ndarray or None, got list"),
    ],
    ids=["len4", "len2", "2d", "0d", "f64", "f16", "i32", "big-endian", "list"],
)
def test_functional_bad_per_channel_array(which, bad, exc, fragment, training):
    x, w, b, rm, rv = _forward_args()
    args = dict(weight=w, bias=b, running_mean=rm, running_var=rv)
    args[which] = bad
    out = np.full(x.shape, 3.0, np.float32)
    with unchanged(x, w, b, rm, rv, out), raises(exc, f"{which}: {fragment}"):
        bnc.batch_norm_forward(x, **args, training=training, out=out)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_functional_running_buffers_must_be_contiguous_and_writeable(which):
    x, w, b, rm, rv = _forward_args()
    strided = np.zeros(6, np.float32)[::2]
    read_only = _read_only(np.zeros(3, np.float32))
    for bad, fragment in ((strided, "expected a C-contiguous array (it is updated in place)"),
                          (read_only, "expected a writeable array (it is updated in place)")):
        args = dict(running_mean=rm, running_var=rv)
        args[which] = bad
        out = np.full(x.shape, 2.0, np.float32)
        with unchanged(x, rm, rv, bad, out), raises(ValueError, f"{which}: {fragment}"):
            bnc.batch_norm_forward(x, w, b, **args, out=out)


def test_functional_eval_needs_running_stats():
    x, w, b, rm, rv = _forward_args()
    out = np.zeros_like(x)
    for args in (dict(), dict(running_mean=rm), dict(running_var=rv)):
        with unchanged(out), raises(ValueError,
                                    "running_mean, running_var: expected both arrays when "
                                    "training=False"):
            bnc.batch_norm_forward(x, w, b, training=False, out=out, **args)


@pytest.mark.parametrize("which", ["save_mean", "save_invstd", "weight"])
def test_backward_bad_per_channel_array(which):
    x, w, _, rm, rv = _forward_args()
    dy = np.ones_like(x)
    args = dict(save_mean=rm, save_invstd=rv, weight=w)
    bad_values = ((np.ones(4, np.float32), ValueError, "expected shape (3,), got (4,)"),
                  (np.ones(3), TypeError, "expected dtype float32, got float64"),
                  ("abc", TypeError, "expected a numpy.ndarray"))
    for bad, exc, fragment in bad_values:
        call = dict(args, **{which: bad})
        out = np.full(x.shape, 4.0, np.float32)
        with unchanged(x, dy, rm, rv, w, out), raises(exc, f"{which}: {fragment}"):
            bnc.batch_norm_backward(dy, x, out=out, **call)
    if which != "weight":
        call = dict(args, **{which: None})
        with raises(TypeError, f"{which}: expected a numpy.ndarray of shape (3,), got None"):
            bnc.batch_norm_backward(dy, x, **call)


def test_backward_dy_and_x_must_match():
    x, w, _, rm, rv = _forward_args()
    out = np.full(x.shape, 1.0, np.float32)
    with unchanged(out), raises(ValueError, "dy: expected the shape of x (4, 3, 2), got (4, 3, 3)"):
        bnc.batch_norm_backward(np.ones((4, 3, 3), np.float32), x, rm, rv, w, out=out)
    with unchanged(out), raises(TypeError,
                                "x: expected dtype float64 (the dtype of dy), got float32"):
        bnc.batch_norm_backward(np.ones(x.shape), x, rm, rv, w, out=out)


# -- non-ndarray inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [[[1.0, 2.0], [3.0, 4.0]], None, 3.0, "x"],
                         ids=["list", "None", "float", "str"])
def test_non_ndarray_inputs(bad):
    kind = type(bad).__name__
    with raises(TypeError, f"x: expected a numpy.ndarray, got {kind}"):
        bnc.batch_norm_forward(bad)
    m = trained(bnc.BatchNorm1d, c=2)
    with module_unchanged(m), raises(TypeError, f"x: expected a numpy.ndarray, got {kind}"):
        m(bad)
    good = np.ones((2, 2))
    with raises(TypeError, f"dy: expected a numpy.ndarray, got {kind}"):
        bnc.batch_norm_backward(bad, good, np.zeros(2), np.ones(2))
    with raises(TypeError, f"x: expected a numpy.ndarray, got {kind}"):
        bnc.batch_norm_backward(good, bad, np.zeros(2), np.ones(2))
    with module_unchanged(m), raises(TypeError, f"dy: expected a numpy.ndarray, got {kind}"):
        m.backward(bad)


# -- module backward -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,shape", MODULE_CASES, ids=MODULE_IDS)
def test_backward_before_forward(cls, shape):
    m = cls(3)
    with module_unchanged(m), raises(ValueError,
                                     "backward: expected a forward call before backward"):
        m.backward(np.ones(shape, np.float32))
    assert m.grad_weight is None and m.grad_bias is None
    # a failed forward does not count as a forward either
    with pytest.raises(ValueError):
        m(np.ones((1, 3) + (1,) * (len(shape) - 2), np.float32))
    with raises(ValueError, "backward: expected a forward call before backward"):
        m.backward(np.ones(shape, np.float32))


@pytest.mark.parametrize("cls,shape", MODULE_CASES, ids=MODULE_IDS)
def test_module_backward_bad_dy(cls, shape):
    m = trained(cls, shape=shape)
    m.backward(np.ones(shape, np.float32))
    grad_weight = m.grad_weight
    bad_shape = (shape[0] + 1,) + shape[1:]
    with module_unchanged(m), raises(ValueError,
                                     f"dy: expected the shape of the last input {shape}, got "
                                     f"{bad_shape}"):
        m.backward(np.ones(bad_shape, np.float32))
    with module_unchanged(m), raises(TypeError, "dy: expected dtype float32 (the last input's), "
                                                "got float64"):
        m.backward(np.ones(shape, np.float64))
    with module_unchanged(m), raises(TypeError, "dy: expected dtype float32"):
        m.backward(np.ones(shape, np.int32))
    assert m.grad_weight is grad_weight


def test_failed_forward_keeps_the_previous_forward_for_backward():
    m = trained(bnc.BatchNorm1d, dtype=np.float64)
    x = np.random.default_rng(3).standard_normal((5, 3))
    dy = np.ones_like(x)
    m(x)
    expected = m.backward(dy)
    with pytest.raises(ValueError):
        m(np.ones((1, 3)))
    with pytest.raises(TypeError):
        m(np.ones((5, 3), np.float32))
    np.testing.assert_array_equal(m.backward(dy), expected)


# -- load_state_dict -------------------------------------------------------------------------------


def _good_state(m):
    state = m.state_dict()
    for key in ("weight", "bias", "running_mean", "running_var"):
        if key in state:
            state[key] = state[key] + 0.5
    state["num_batches_tracked"] = np.array(7, dtype=np.int64)
    return state


@pytest.mark.parametrize(
    "key,value,exc,fragment",
    [
        ("weight", np.ones(4, np.float32), ValueError, "weight: expected shape (3,), got (4,)"),
        ("bias", np.ones((1, 3), np.float32), ValueError, "bias: expected shape (3,), got (1, 3)"),
        ("running_var", np.ones(2, np.float32), ValueError, "running_var: expected shape (3,)"),
        ("running_mean", np.ones(3, np.float64), TypeError,
         "running_mean: expected dtype float32, got float64"),
        ("running_var", np.ones(3, np.float16), TypeError, "running_var: expected dtype float32"),
        ("weight", np.ones(3, np.int64), TypeError, "weight: expected dtype float32, got int64"),
        ("num_batches_tracked", np.array([1, 2]), ValueError,
         "num_batches_tracked: expected a 0-d integer array"),
        ("num_batches_tracked", np.array(2.0), TypeError, "num_batches_tracked"),
    ],
    ids=["weight-len", "bias-2d", "running_var-len", "running_mean-f64", "running_var-f16",
         "weight-int", "nbt-shape", "nbt-float"],
)
def test_load_state_dict_bad_values(key, value, exc, fragment):
    m = trained(bnc.BatchNorm2d)
    state = _good_state(m)
    state[key] = value
    with module_unchanged(m), raises(exc, fragment):
        m.load_state_dict(state)


@pytest.mark.parametrize("missing", ["weight", "bias", "running_mean", "running_var",
                                     "num_batches_tracked"])
def test_load_state_dict_missing_key(missing):
    m = trained(bnc.BatchNorm2d)
    state = _good_state(m)
    del state[missing]
    with module_unchanged(m), raises(ValueError, f"missing keys ['{missing}']"):
        m.load_state_dict(state)
    # strict=False: as PyTorch, the keys present load and the missing one is left as it was
    other = trained(bnc.BatchNorm2d)
    before = other.state_dict()
    assert other.load_state_dict(state, strict=False) == ([missing], [])
    after = other.state_dict()
    np.testing.assert_array_equal(after[missing], before[missing])
    for key in state:
        np.testing.assert_array_equal(after[key], state[key])


def test_load_state_dict_unexpected_key_and_bad_container():
    m = trained(bnc.BatchNorm2d, affine=False)
    state = _good_state(trained(bnc.BatchNorm2d))  # has weight and bias
    with module_unchanged(m), raises(ValueError, "unexpected keys ['weight', 'bias']"):
        m.load_state_dict(state)
    assert m.load_state_dict(state, strict=False) == ([], ["weight", "bias"])  # ignored
    assert m.num_batches_tracked == 7
    with raises(TypeError, "state_dict: expected a dict, got list"):
        m.load_state_dict(list(state.items()))


def test_load_state_dict_is_all_or_nothing():
    """A bad value late in the dict leaves the earlier (valid) values unloaded."""
    m = trained(bnc.BatchNorm1d)
    state = _good_state(m)
    state["running_var"] = np.ones(3, np.float64)  # the last array checked
    with module_unchanged(m), pytest.raises(TypeError):
        m.load_state_dict(state)
    state["running_var"] = np.ones(3, np.float32)
    state["num_batches_tracked"] = np.array([[1]])
    with module_unchanged(m), pytest.raises(ValueError):
        m.load_state_dict(state)


# -- bnc._core called directly: must raise, never crash or write -----------------------------------


def _core_train_args(dtype=np.float32, shape=(4, 3)):
    rng = np.random.default_rng(0)
    c = shape[1]
    return dict(
        x=rng.standard_normal(shape).astype(dtype),
        out=np.full(shape, 9.0, dtype),
        weight=np.ones(c, dtype), bias=np.zeros(c, dtype),
        running_mean=np.zeros(c, dtype), running_var=np.ones(c, dtype),
        axis=1, eps=1e-5, momentum=0.1,
        save_mean=np.full(c, 9.0, dtype), save_invstd=np.full(c, 9.0, dtype),
    )


def _core_eval_args(dtype=np.float32, shape=(4, 3)):
    args = _core_train_args(dtype, shape)
    del args["momentum"]
    return args


def _core_backward_args(dtype=np.float32, shape=(4, 3)):
    rng = np.random.default_rng(1)
    c = shape[1]
    return dict(
        dy=rng.standard_normal(shape).astype(dtype),
        x=rng.standard_normal(shape).astype(dtype),
        out=np.full(shape, 9.0, dtype),
        save_mean=np.zeros(c, dtype), save_invstd=np.ones(c, dtype), weight=np.ones(c, dtype),
        axis=1, training=True,
        grad_weight=np.full(c, 9.0, dtype), grad_bias=np.full(c, 9.0, dtype),
    )


CORE_FUNCS = {
    "forward_train": (_core.forward_train, _core_train_args),
    "forward_eval": (_core.forward_eval, _core_eval_args),
    "backward": (_core.backward, _core_backward_args),
}


def _call_core(func_name, args):
    func, _ = CORE_FUNCS[func_name]
    arrays = [v for v in args.values() if isinstance(v, np.ndarray)]
    with unchanged(*arrays):
        func(**args)


def _arrays(func_name):
    return [k for k, v in CORE_FUNCS[func_name][1]().items() if isinstance(v, np.ndarray)]


def _outputs(func_name):
    return {"forward_train": ["out", "running_mean", "running_var", "save_mean", "save_invstd"],
            "forward_eval": ["out", "save_mean", "save_invstd"],
            "backward": ["out", "grad_weight", "grad_bias"]}[func_name]


CORE_ARRAY_CASES = [(f, a) for f in CORE_FUNCS for a in _arrays(f)]
CORE_OUTPUT_CASES = [(f, a) for f in CORE_FUNCS for a in _outputs(f)]


@pytest.mark.parametrize("func_name,arg", CORE_ARRAY_CASES)
def test_core_wrong_dtype(func_name, arg):
    args = CORE_FUNCS[func_name][1]()
    args[arg] = args[arg].astype(np.float64)  # for x (dy): the other arrays are then wrong
    with pytest.raises(TypeError, match=r"expected dtype float(16|32|64)"):
        _call_core(func_name, args)
    args = CORE_FUNCS[func_name][1]()
    args[arg] = args[arg].astype(np.int32)
    with pytest.raises(TypeError, match=r"expected dtype"):
        _call_core(func_name, args)


@pytest.mark.parametrize("func_name", list(CORE_FUNCS))
def test_core_non_native_byte_order(func_name):
    """A byte-swapped float32 array has dtype.char 'f' too; it must be rejected, not mis-read
    (inputs) or written in the wrong byte order (outputs)."""
    accepted = []
    for arg in _arrays(func_name):
        args = CORE_FUNCS[func_name][1]()
        args[arg] = args[arg].astype(args[arg].dtype.newbyteorder(">"))
        try:
            _call_core(func_name, args)
        except TypeError as error:
            assert "expected dtype" in str(error), (arg, str(error))
        except AssertionError:  # not rejected, and an argument was written
            accepted.append(arg)
        else:
            accepted.append(arg)
    assert accepted == [], f"bnc._core.{func_name} accepted non-native byte order for {accepted}"


@pytest.mark.parametrize("func_name,arg", CORE_ARRAY_CASES)
def test_core_non_contiguous(func_name, arg):
    args = CORE_FUNCS[func_name][1]()
    a = args[arg]
    wide = np.repeat(a, 2, axis=-1)
    args[arg] = wide[..., ::2]
    assert not args[arg].flags.c_contiguous and args[arg].shape == a.shape
    with raises(ValueError, f"{arg}: expected a C-contiguous array, got a strided one"):
        _call_core(func_name, args)


@pytest.mark.parametrize("func_name,arg", CORE_ARRAY_CASES)
def test_core_wrong_length(func_name, arg):
    args = CORE_FUNCS[func_name][1]()
    a = args[arg]
    if a.ndim == 1:
        args[arg] = np.ones(a.size + 1, a.dtype)
        fragment = f"{arg}: expected shape (3,), got (4,)"
    else:
        args[arg] = np.ones((a.shape[0] + 1,) + a.shape[1:], a.dtype)
        fragment = "expected shape (4, 3), got (5, 3)"
    if func_name == "backward" and arg == "dy":
        fragment = "x: expected shape (5, 3), got (4, 3)"  # dy defines the shape
    elif func_name != "backward" and arg == "x":
        fragment = "out: expected shape (5, 3), got (4, 3)"  # x defines the shape
    with raises(ValueError, fragment):
        _call_core(func_name, args)


@pytest.mark.parametrize("func_name,arg", CORE_OUTPUT_CASES)
def test_core_read_only_output(func_name, arg):
    args = CORE_FUNCS[func_name][1]()
    args[arg] = _read_only(args[arg])
    with raises(ValueError, f"{arg}: expected a writeable array, got a read-only one"):
        _call_core(func_name, args)


@pytest.mark.parametrize("func_name,arg", CORE_OUTPUT_CASES)
def test_core_overlapping_outputs(func_name, arg):
    args = CORE_FUNCS[func_name][1]()
    # alias this output with another argument of the same shape
    same_shape = [k for k in _arrays(func_name) if k != arg and args[k].shape == args[arg].shape]
    for other in same_shape:
        call = dict(args)
        call[arg] = call[other]
        with pytest.raises(ValueError, match="expected memory not shared with"):
            _call_core(func_name, call)


def test_core_partially_overlapping_out():
    buf = np.zeros((5, 3), np.float32)
    args = _core_train_args()
    buf[:4] = args["x"]
    args["x"], args["out"] = buf[:4], buf[1:]
    with raises(ValueError, "out: expected memory not shared with x"):
        _call_core("forward_train", args)
    args = _core_backward_args()
    buf[1:] = args["x"]
    args["x"], args["out"] = buf[1:], buf[:4]
    with raises(ValueError, "out: expected memory not shared with x"):
        _call_core("backward", args)


@pytest.mark.parametrize("func_name", list(CORE_FUNCS))
@pytest.mark.parametrize("arg", ["x", "out"])
def test_core_non_array_arguments(func_name, arg):
    args = CORE_FUNCS[func_name][1]()
    key = "dy" if (func_name == "backward" and arg == "x") else arg
    args[key] = args[key].tolist()
    with raises(TypeError, f"{key}: expected a numpy.ndarray, got list"):
        _call_core(func_name, args)
    args[key] = None
    with raises(TypeError, f"{key}: expected a numpy.ndarray, got NoneType"):
        _call_core(func_name, args)


@pytest.mark.parametrize("func_name", ["forward_train", "forward_eval"])
def test_core_eps_and_axis(func_name):
    for eps in (0.0, -1.0, float("nan")):
        args = CORE_FUNCS[func_name][1]()
        args["eps"] = eps
        with raises(ValueError, "eps must be positive"):
            _call_core(func_name, args)
    for axis in (2, -1, 100):
        args = CORE_FUNCS[func_name][1]()
        args["axis"] = axis
        with raises(ValueError, "axis: expected 0 <= axis < 2, got"):
            _call_core(func_name, args)


def test_core_backward_axis():
    for axis in (2, -1):
        args = _core_backward_args()
        args["axis"] = axis
        with raises(ValueError, "axis: expected 0 <= axis < 2, got"):
            _call_core("backward", args)


def test_core_forward_train_one_value_per_channel():
    for shape in ((1, 3), (0, 3)):
        args = _core_train_args(shape=shape)
        with raises(ValueError, "Expected more than 1 value per channel when training"):
            _call_core("forward_train", args)


def test_core_optional_arguments_may_be_none_but_required_ones_may_not():
    args = _core_train_args()
    for k in ("weight", "bias", "running_mean", "running_var"):
        args[k] = None
    _core.forward_train(**args)  # all four optional
    for func_name, required in (("forward_train", ["save_mean", "save_invstd"]),
                                ("forward_eval", ["running_mean", "running_var", "save_mean",
                                                  "save_invstd"]),
                                ("backward", ["x", "save_mean", "save_invstd", "grad_weight",
                                              "grad_bias"])):
        for k in required:
            call = CORE_FUNCS[func_name][1]()
            call[k] = None
            with raises(TypeError, f"{k}: expected a numpy.ndarray, got NoneType"):
                _call_core(func_name, call)


def test_core_float16_needs_float32_parameters():
    args = _core_train_args(np.float16)
    with raises(TypeError, "weight: expected dtype float32, got float16"):
        _call_core("forward_train", args)
    for k in ("weight", "bias", "running_mean", "running_var", "save_mean", "save_invstd"):
        args[k] = args[k].astype(np.float32)
    _core.forward_train(**args)
