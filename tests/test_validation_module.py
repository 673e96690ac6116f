"""Bad arguments to the modules (BatchNorm1d/2d/3d): constructor, input, backward,
load_state_dict, corrupted attributes. The exception type, a fragment of its message, and that the
module's parameters, buffers, counters and saved forward are unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    BAD_DTYPES,
    F32,
    F64,
    collect_failures,
    malformed,
    module_unchanged,
    raises,
    rejects,
    trained,
)

import bnc

MODULE_CASES = [
    (bnc.BatchNorm1d, (4, 3)),
    (bnc.BatchNorm1d, (4, 3, 2)),
    (bnc.BatchNorm2d, (2, 3, 2, 2)),
    (bnc.BatchNorm3d, (2, 3, 2, 2, 2)),
]
MODULE_IDS = ["1d", "1d-3D", "2d", "3d"]

EXPECTED_FLOAT = "{}: expected dtype float16, float32, float64 or bfloat16"


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


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cls,shape", MODULE_CASES, ids=MODULE_IDS)
def test_module_non_float_input(cls, shape, dtype):
    m = trained(cls)
    x = np.ones(shape, dtype)
    with module_unchanged(m), raises(TypeError, EXPECTED_FLOAT.format("x")):
        m(x)


@pytest.mark.parametrize("cls,shape", MODULE_CASES, ids=MODULE_IDS)
def test_module_float64_input_into_float32_module(cls, shape):
    m = trained(cls)
    for training in (True, False):
        m.train(training)
        with module_unchanged(m), raises(TypeError,
                                         "x: expected dtype float32, float16 or bfloat16 (the "
                                         "module's dtype), got float64"):
            m(np.ones(shape, np.float64))


def test_module_float32_and_float16_input_into_float64_module():
    m = trained(bnc.BatchNorm1d, dtype=np.float64)
    for dtype in (np.float32, np.float16):
        with module_unchanged(m), raises(TypeError, "x: expected dtype float64 (the module's"):
            m(np.ones((4, 3), dtype))


# -- constructor arguments -------------------------------------------------------------------------


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


INT64_MAX = 2**63 - 1


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    "value,shown",
    [
        (np.uint64(2**64 - 1), "18446744073709551615"),
        (np.array(2**63, np.uint64), "9223372036854775808"),
        (2**63, "9223372036854775808"),
        (np.array([2**64 - 1], np.uint64), "18446744073709551615"),
        (np.int64(-1), "-1"),
        (np.array(-(2**63)), "-9223372036854775808"),
        (-1, "-1"),
        (np.array(-3, np.int8), "-3"),
    ],
    ids=["uint64-max", "uint64-2^63", "int-2^63", "uint64-max-1d", "int64-minus1", "int64-min",
         "int-minus1", "int8-minus3"],
)
def test_load_state_dict_refuses_counts_an_int64_cannot_hold(value, shown, strict):
    """A count beyond int64 could never be saved again (state_dict gives int64); a negative one
    makes the next momentum=None forward divide by zero. Refused, with the whole module as it
    was: the valid arrays in the same dict are not loaded either."""
    m = trained(bnc.BatchNorm2d, momentum=None)
    state = _good_state(m)
    state["num_batches_tracked"] = value
    with module_unchanged(m), raises(
        ValueError,
        f"num_batches_tracked: expected a non-negative count an int64 can hold (0 to "
        f"{INT64_MAX}), got {shown}",
    ):
        m.load_state_dict(state, strict=strict)
    m(np.ones((2, 3, 2, 2), np.float32) + np.arange(2, dtype=np.float32)[:, None, None, None])
    assert m.num_batches_tracked == 2


@pytest.mark.parametrize("value", [0, np.uint64(INT64_MAX), np.array(INT64_MAX, np.int64),
                                   np.array([5], np.uint8)])
def test_load_state_dict_counts_at_the_limits(value):
    m = trained(bnc.BatchNorm2d)
    state = _good_state(m)
    state["num_batches_tracked"] = value
    m.load_state_dict(state)
    count = np.asarray(value).item()
    assert type(m.num_batches_tracked) is int and m.num_batches_tracked == count
    saved = m.state_dict()["num_batches_tracked"]
    assert saved.dtype == np.int64 and saved.shape == () and saved == count


@pytest.mark.parametrize("count", [INT64_MAX, -1])
def test_training_step_refuses_a_count_it_cannot_advance(count):
    """A count of the int64 maximum loads (state_dict can save it), but a training step would
    take it past what state_dict saves; a negative count (set as an attribute) would divide by
    zero with momentum=None. Refused before anything is written; eval still runs."""
    for momentum in (0.1, None):
        m = trained(bnc.BatchNorm1d, momentum=momentum)
        if count >= 0:
            state = m.state_dict()
            state["num_batches_tracked"] = np.array(count, np.int64)
            m.load_state_dict(state)
        else:
            m.num_batches_tracked = count
        x = np.arange(12, dtype=np.float32).reshape(4, 3)
        with module_unchanged(m), raises(
            ValueError,
            f"num_batches_tracked: expected a non-negative count below {INT64_MAX} before a "
            f"training step, got {count}",
        ):
            m(x)
        m.eval()(x)
        assert m.num_batches_tracked == count


def test_load_state_dict_reads_every_value_before_writing_any():
    """A state dict may hold the module's own arrays (a swap, or one buffer loaded into another):
    each key gets the value it had when the call began, not one already overwritten."""
    m = trained(bnc.BatchNorm1d)
    weight, bias = m.weight.copy(), m.bias.copy()
    rm, rv = m.running_mean.copy(), m.running_var.copy()
    state = {"weight": m.bias, "bias": m.weight, "running_mean": m.running_var,
             "running_var": m.running_mean[::-1], "num_batches_tracked": 4}
    m.load_state_dict(state)
    np.testing.assert_array_equal(m.weight, bias)
    np.testing.assert_array_equal(m.bias, weight)
    np.testing.assert_array_equal(m.running_mean, rv)
    np.testing.assert_array_equal(m.running_var, rm[::-1])


# -- train(mode) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["False", "True", "", 0, 1, None, 1.0, np.array(True),
                                  np.array([False]), np.int64(0)],
                         ids=lambda v: f"{type(v).__name__}-{v!r}")
@pytest.mark.parametrize("training", [True, False])
def test_train_refuses_non_bool_modes(mode, training):
    """train("False") would set training mode (a non-empty string is true): a mode that is not a
    bool is refused, and the module keeps its mode."""
    m = trained(bnc.BatchNorm2d).train(training)
    with module_unchanged(m), raises(
        TypeError, f"train: training mode is expected to be boolean, got {type(mode).__name__}"
    ):
        m.train(mode)
    assert m.training is training


def test_train_accepts_numpy_bools():
    m = bnc.BatchNorm1d(3)
    assert m.train(np.False_) is m and m.training is False
    assert m.train(np.bool_(True)).training is True
    assert type(m.training) is bool


# -- every malformed input and corrupted attribute -------------------------------------------------


def test_module_rejects_malformed_input_and_state():
    rng = np.random.default_rng(82)
    x = rng.standard_normal((4, 3, 2, 2)).astype(F32)
    failures = []
    with collect_failures(failures):
        for training in (True, False):
            m = bnc.BatchNorm2d(3).train(training)
            m(x)
            state = m.state_dict()
            for name, value in malformed(x.shape, F32, required=True, output=False,
                                         float16_ok=True):
                failures.append(rejects(lambda: m(value), f"training={training} x={name}"))
            for name, value in malformed(x.shape, F32, required=True, output=False):
                failures.append(rejects(lambda: m.backward(value),
                                        f"training={training} backward dy={name}"))
            # corrupted attributes are caught by the functional layer, not crashed on
            corruptions = [
                ("weight", np.ones(3, F64)), ("weight", [1.0, 1.0, 1.0]), ("bias", np.ones(4, F32)),
                ("bias", np.ones(3, np.complex64)), ("running_mean", np.ones(3, object)),
                ("running_var", np.ones(3, np.int32)), ("eps", float("nan")), ("eps", -1.0),
                ("eps", "x"), ("eps", 10**400), ("axis", 7), ("axis", "1"), ("axis", 1.0),
            ]
            if training:
                ro = np.zeros(3, F32)
                ro.flags.writeable = False
                corruptions += [("momentum", float("nan")), ("momentum", "0.1"),
                                ("momentum", 10**400), ("momentum", -(10**400)),
                                ("running_mean", ro), ("running_var", np.ones(6, F32)[::2])]
            else:
                corruptions += [("running_var", None)]
            for attr, value in corruptions:
                saved = getattr(m, attr)
                setattr(m, attr, value)
                try:
                    failures.append(rejects(lambda: m(x),
                                            f"training={training} {attr}={value!r}"))
                finally:
                    setattr(m, attr, saved)
            after = m.state_dict()
            for k in state:
                assert np.array_equal(state[k], after[k]), f"a rejected call changed {k}"
