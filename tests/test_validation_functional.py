"""Bad arguments to the functional API (bnc.batch_norm_forward / batch_norm_backward,
bnc.set_num_threads): the exception type, a fragment of its message, and that nothing the caller
owns (running statistics, out, inputs) was modified; then every malformed value for every argument
at once (TypeError or ValueError, never a crash). Modules: test_validation_module.py; bnc._core:
test_validation_core.py."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from helpers import (
    BAD_DTYPES,
    F16,
    F32,
    case_id,
    collect_failures,
    make_read_only,
    malformed,
    module_unchanged,
    raises,
    rejects,
    snapshot,
    trained,
    unchanged,
    untouched,
)

import bnc
from bnc import _core

# -- one value per channel -------------------------------------------------------------------------

EXPECTED_FLOAT = "{}: expected dtype float16, float32, float64 or bfloat16"


@pytest.mark.parametrize("shape,axis", [((1, 3), 1), ((1, 1, 1, 3), -1), ((1, 3, 1, 1), 1)])
def test_functional_one_value_per_channel_when_training(shape, axis):
    x = np.ones(shape, np.float64)
    rm, rv, out = np.zeros(3), np.ones(3), np.full(shape, 7.0)
    with unchanged(rm, rv, out), raises(ValueError,
                                        "Expected more than 1 value per channel when training"):
        bnc.batch_norm_forward(x, None, None, rm, rv, axis=axis, out=out)
    bnc.batch_norm_forward(x, None, None, rm, rv, training=False, axis=axis)


# -- input shape, channels, dtype ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3,), ()])
def test_input_with_fewer_than_two_dimensions(shape):
    m = trained(bnc.BatchNorm1d)
    with module_unchanged(m), raises(ValueError, "x: expected at least 2 dimensions"):
        m(np.ones(shape, np.float32))
    with raises(ValueError, "x: expected at least 2 dimensions"):
        bnc.batch_norm_forward(np.ones(shape, np.float32))
    with raises(ValueError, "dy: expected at least 2 dimensions"):
        bnc.batch_norm_backward(np.ones(shape), np.ones(shape), np.zeros(1), np.ones(1))


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_functional_non_float_input(dtype):
    x = np.ones((4, 3), dtype)
    out = np.full((4, 3), 5.0, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with unchanged(out, rm, rv), raises(TypeError, EXPECTED_FLOAT.format("x")):
        bnc.batch_norm_forward(x, running_mean=rm, running_var=rv, out=out)
    with unchanged(out), raises(TypeError, EXPECTED_FLOAT.format("dy")):
        bnc.batch_norm_backward(x, x, np.zeros(3), np.ones(3), out=out)
    good = np.ones((4, 3), np.float32)
    with unchanged(out), raises(TypeError, "x: expected dtype float32 (the dtype of dy), got"):
        bnc.batch_norm_backward(good, x, rm, rv, out=out)


def test_non_native_byte_order_input():
    x = np.ones((4, 3), ">f4")
    with raises(TypeError, "non-native byte order"):
        bnc.batch_norm_forward(x)
    with raises(TypeError, "non-native byte order"):
        bnc.BatchNorm1d(3)(x)
    with raises(TypeError, "weight: expected dtype float32"):
        bnc.batch_norm_forward(np.ones((4, 3), np.float32), np.ones(3, ">f4"))


# -- eps, momentum, axis, thread count -------------------------------------------------------------


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


BEYOND_FLOAT = [
    (10**400, "an int beyond the float range (about 1e+400)"),
    (-(10**400), "an int beyond the float range (about -1e+400)"),
    (10**5000, "an int beyond the float range (about 1e+5000)"),  # too long for str()
    (Fraction(3 * 10**400, 7), "a Fraction beyond the float range (about 4e+399)"),
]


@pytest.mark.parametrize("value,shown", BEYOND_FLOAT, ids=["1e400", "-1e400", "1e5000", "Fraction"])
def test_eps_and_momentum_beyond_the_float_range(value, shown):
    """float(10**400) raises OverflowError: such a value is as out of range as inf, a ValueError
    that shows it without its hundreds of digits."""
    eps_message = f"eps must be positive and finite, got {shown}"
    momentum_message = f"momentum: expected a finite float, got {shown}"
    for cls in (bnc.BatchNorm1d, bnc.BatchNorm2d, bnc.BatchNorm3d):
        with raises(ValueError, eps_message):
            cls(3, eps=value)
        with raises(ValueError, momentum_message):
            cls(3, momentum=value)
    x = np.ones((4, 3), np.float32)
    rm, rv, out = np.zeros(3, np.float32), np.ones(3, np.float32), np.zeros((4, 3), np.float32)
    for training in (True, False):
        with unchanged(x, rm, rv, out), raises(ValueError, eps_message):
            bnc.batch_norm_forward(x, None, None, rm, rv, training=training, eps=value, out=out)
        with unchanged(x, rm, rv, out), raises(ValueError, momentum_message):
            bnc.batch_norm_forward(x, None, None, rm, rv, training=training, momentum=value,
                                   out=out)
    # a module whose attributes were set to such a value is refused the same way
    for attr, message in (("eps", eps_message), ("momentum", momentum_message)):
        m = trained(bnc.BatchNorm1d)
        setattr(m, attr, value)
        with module_unchanged(m), raises(ValueError, message):
            m(x)


def test_eps_and_momentum_large_but_finite_are_accepted():
    """Numbers that float() holds stay accepted, whatever their type."""
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    for value in (10**300, Fraction(10**300, 3), np.longdouble(1e300)):
        bnc.batch_norm_forward(x, eps=value)
        bnc.batch_norm_forward(x, None, None, np.zeros(3), np.ones(3), momentum=value)


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
    ("read-only", lambda x: make_read_only(np.zeros(x.shape, x.dtype)), ValueError,
     "out: expected a writeable array, got a read-only one"),
    ("list", lambda x: np.zeros(x.shape, x.dtype).tolist(), TypeError,
     "out: expected a numpy.ndarray or None, got list"),
]


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
        ([1.0, 1.0, 1.0], TypeError, "expected a numpy.ndarray"),
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
    read_only = make_read_only(np.zeros(3, np.float32))
    for bad, fragment in ((strided, "expected a C-contiguous array, got a strided one"),
                          (read_only, "expected a writeable array, got a read-only one")):
        args = dict(running_mean=rm, running_var=rv)
        args[which] = bad
        out = np.full(x.shape, 2.0, np.float32)
        with unchanged(x, rm, rv, bad, out), raises(ValueError, f"{which}: {fragment}"):
            bnc.batch_norm_forward(x, w, b, **args, out=out)


def test_eval_accepts_read_only_and_strided_running_statistics():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 4, 3)).astype(np.float32)
    rm = np.zeros(8, np.float32)[::2]  # strided
    rv = np.ones(4, np.float32)
    rv.flags.writeable = False
    y, _, _ = bnc.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)
    with pytest.raises(ValueError, match="running_var: expected a writeable array"):
        bnc.batch_norm_forward(x, running_mean=np.zeros(4, np.float32), running_var=rv)


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
    with unchanged(out), raises(ValueError,
                                "x: expected shape (4, 3, 3) (the shape of dy), got (4, 3, 2)"):
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


# -- every malformed value of every argument -------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F16], ids=case_id)
def test_functional_forward_rejects_malformed_arguments(dtype):
    shape, c = (4, 3, 5), 3
    p = F32 if dtype == F16 else dtype
    rng = np.random.default_rng(80)
    x = rng.standard_normal(shape).astype(dtype)
    good = dict(weight=np.ones(c, p), bias=np.zeros(c, p), running_mean=np.zeros(c, p),
                running_var=np.ones(c, p), out=np.full(shape, 7, dtype))
    failures = []
    with collect_failures(failures):
        for training in (True, False):
            def call(**over):
                args = dict(good, **over)
                kwargs = {k: args.pop(k) for k in ("training", "momentum", "eps", "axis", "out")
                          if k in args}
                xa = args.pop("x", x)
                return lambda: bnc.batch_norm_forward(xa, **args, training=training, **kwargs)

            owned = [x, good["running_mean"], good["running_var"], good["out"]]
            before = snapshot(*owned)
            for name, value in malformed(shape, dtype, required=True, output=False,
                                         float16_ok=True):
                failures.append(rejects(call(x=value), f"training={training} x={name}"))
            for name, value in malformed(shape, dtype, required=False, output=True,
                                         aliases=[("aliasing-x", x)]):
                failures.append(rejects(call(out=value), f"training={training} out={name}"))
            buf = np.ones((shape[0] + 1,) + shape[1:], dtype)
            failures.append(rejects(call(x=buf[:-1], out=buf[1:]),
                                    f"training={training} out partially overlapping x"))
            for arg in ("weight", "bias", "running_mean", "running_var"):
                # running statistics are written only when training; in eval, like weight and
                # bias, a strided or read-only array is fine (it is only read)
                in_place = arg.startswith("running") and training
                for name, value in malformed((c,), p, required=False, output=in_place):
                    if name == "negative-stride" and not in_place:
                        continue
                    failures.append(rejects(call(**{arg: value}),
                                            f"training={training} {arg}={name}"))
            if not training:
                for arg in ("running_mean", "running_var"):
                    failures.append(rejects(call(**{arg: None}), f"eval {arg}=None"))
            # per-channel arrays aliasing each other or x, when written in place (training)
            if training:
                shared = np.zeros(c, p)
                failures.append(rejects(call(running_mean=shared, running_var=shared),
                                        "running_mean is running_var"))
                failures.append(rejects(call(running_mean=good["weight"]),
                                        "running_mean is weight"))
            for eps in (float("nan"), float("inf"), -1.0, 0.0, -0.0, "1e-5", None, 1e-5j, True,
                        np.array([1e-5]), 10**400, -(10**400), Fraction(10**400)):
                failures.append(rejects(call(eps=eps), f"training={training} eps={eps!r}"))
            for axis in (3, -4, 2 ** 63, -(2 ** 63), 2 ** 70, 1.0, "1", None, True,
                         np.float64(1.0), np.array([1])):
                failures.append(rejects(call(axis=axis), f"training={training} axis={axis!r}"))
            if training:
                for momentum in (float("nan"), float("inf"), -float("inf"), "0.1", None, True,
                                 0.1j, 10**400, -(10**400), Fraction(10**400)):
                    failures.append(rejects(call(momentum=momentum),
                                            f"momentum={momentum!r}"))
            assert untouched(owned, before), "a rejected call modified x, running stats or out"


@pytest.mark.parametrize("dtype", [F32, F16], ids=case_id)
def test_functional_backward_rejects_malformed_arguments(dtype):
    shape, c = (4, 3, 5), 3
    p = F32 if dtype == F16 else dtype
    rng = np.random.default_rng(81)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    good = dict(dy=dy, x=x, save_mean=np.zeros(c, p), save_invstd=np.ones(c, p),
                weight=np.ones(c, p), out=np.full(shape, 7, dtype))
    failures = []
    with collect_failures(failures):
        for training in (True, False):
            def call(**over):
                a = dict(good, **over)
                return lambda: bnc.batch_norm_backward(
                    a["dy"], a["x"], a["save_mean"], a["save_invstd"], a["weight"],
                    training=training, axis=a.get("axis", 1), out=a["out"])

            before = snapshot(x, dy, good["out"])
            for arg in ("dy", "x"):
                for name, value in malformed(shape, dtype, required=True, output=False):
                    failures.append(rejects(call(**{arg: value}), f"{arg}={name}"))
            for name, value in malformed(shape, dtype, required=False, output=True,
                                         aliases=[("aliasing-x", x), ("aliasing-dy", dy)]):
                failures.append(rejects(call(out=value), f"out={name}"))
            for arg in ("save_mean", "save_invstd", "weight"):
                for name, value in malformed((c,), p, required=arg != "weight", output=False):
                    failures.append(rejects(call(**{arg: value}), f"{arg}={name}"))
            for axis in (3, -4, 2 ** 70, 1.0, "1", None, True):
                failures.append(rejects(call(axis=axis), f"axis={axis!r}"))
            assert untouched([x, dy, good["out"]], before), "a rejected call modified its input"
