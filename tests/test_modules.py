"""BatchNorm1d/2d/3d modules: state, modes, running statistics, backward, state_dict (also against
PyTorch's). Bad arguments: test_validation_module.py; NaN/Inf input: test_nonfinite.py."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import reference
from helpers import shifted_normal

import bnc

MODULES = {1: bnc.BatchNorm1d, 2: bnc.BatchNorm2d, 3: bnc.BatchNorm3d}
# One input shape per (module, layout); C = 4 everywhere.
SHAPES = {
    ("1d", 1): (8, 4),
    ("1d3", 1): (6, 4, 5),
    ("2d", 1): (3, 4, 5, 5),
    ("3d", 1): (2, 4, 3, 3, 3),
    ("1d3", -1): (6, 5, 4),
    ("2d", -1): (3, 5, 5, 4),
    ("3d", -1): (2, 3, 3, 3, 4),
}
CLASS_OF = {"1d": bnc.BatchNorm1d, "1d3": bnc.BatchNorm1d, "2d": bnc.BatchNorm2d,
            "3d": bnc.BatchNorm3d}
TOL = {np.float32: 1e-5, np.float64: 1e-10}


def _assert_close(a, b, dtype, scale=1.0):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("cls", [bnc.BatchNorm1d, bnc.BatchNorm2d, bnc.BatchNorm3d])
def test_defaults(cls):
    m = cls(5)
    assert m.num_features == 5
    assert m.eps == 1e-5 and m.momentum == 0.1
    assert m.affine is True and m.track_running_stats is True
    assert m.axis == 1 and m.dtype == np.float32
    assert m.training is True
    for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                        ("running_var", 1.0)):
        a = getattr(m, name)
        assert isinstance(a, np.ndarray) and a.shape == (5,) and a.dtype == np.float32, name
        assert a.flags.c_contiguous and a.flags.writeable
        np.testing.assert_array_equal(a, value)
    assert m.num_batches_tracked == 0
    assert m.grad_weight is None and m.grad_bias is None
    assert cls.__name__ in repr(m)


def test_float64_module_and_options():
    m = bnc.BatchNorm2d(3, eps=1e-3, momentum=0.25, axis=-1, dtype=np.float64)
    assert m.eps == 1e-3 and m.momentum == 0.25 and m.axis == -1
    for a in (m.weight, m.bias, m.running_mean, m.running_var):
        assert a.dtype == np.float64
    m2 = bnc.BatchNorm1d(3, dtype="float64")
    assert m2.weight.dtype == np.float64


def test_affine_false():
    m = bnc.BatchNorm2d(4, affine=False)
    assert m.weight is None and m.bias is None
    x = shifted_normal((3, 4, 5, 5), np.float32, 0)
    y = m(x)
    ry = reference.forward(x, training=True)[0]
    _assert_close(y, ry, np.float32)
    dx = m.backward(np.ones_like(x))
    assert dx.shape == x.shape
    assert m.grad_weight is None and m.grad_bias is None
    assert list(m.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]


def test_bias_false():
    m = bnc.BatchNorm1d(4, bias=False)
    assert m.bias is None
    assert isinstance(m.weight, np.ndarray) and m.weight.shape == (4,)
    m.weight[:] = [1.0, -2.0, 0.5, 3.0]
    x = shifted_normal((8, 4), np.float32, 1)
    dy = shifted_normal((8, 4), np.float32, 2)
    y = m(x)
    ry, mean, invstd, _, _ = reference.forward(x, m.weight, None, training=True)
    _assert_close(y, ry, np.float32, scale=3.0)
    dx = m.backward(dy)
    rdx, rgw, _ = reference.backward(dy, x, mean, invstd, m.weight)
    _assert_close(dx, rdx, np.float32, scale=10.0)
    _assert_close(m.grad_weight, rgw, np.float32, scale=10.0)
    assert m.grad_bias is None
    assert list(m.state_dict()) == ["weight", "running_mean", "running_var",
                                    "num_batches_tracked"]


@pytest.mark.parametrize("layout", list(SHAPES), ids=lambda k: f"{k[0]}-axis{k[1]}")
def test_track_running_stats_false_uses_batch_stats_in_eval(layout):
    kind, axis = layout
    shape = SHAPES[layout]
    m = CLASS_OF[kind](4, track_running_stats=False, axis=axis)
    assert m.running_mean is None and m.running_var is None and m.num_batches_tracked is None
    x = shifted_normal(shape, np.float32, 3)
    y_train = m(x)
    assert m.eval() is m
    y_eval = m(x)
    ry = reference.forward(x, training=True, axis=axis)[0]
    _assert_close(y_train, ry, np.float32)
    np.testing.assert_array_equal(y_eval, y_train)
    assert m.running_mean is None and m.num_batches_tracked is None
    # backward in eval mode still differentiates through the batch statistics
    dy = shifted_normal(shape, np.float32, 4)
    dx = m.backward(dy)
    _, mean, invstd, _, _ = reference.forward(x, training=True, axis=axis)
    rdx, rgw, rgb = reference.backward(dy, x, mean, invstd, training=True, axis=axis)
    _assert_close(dx, rdx, np.float32, scale=5.0)
    _assert_close(m.grad_weight, rgw, np.float32, scale=10.0)
    _assert_close(m.grad_bias, rgb, np.float32, scale=10.0)
    assert list(m.state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("layout", list(SHAPES), ids=lambda k: f"{k[0]}-axis{k[1]}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_training_steps_then_eval_match_reference(layout, dtype):
    kind, axis = layout
    shape = SHAPES[layout]
    m = CLASS_OF[kind](4, momentum=0.2, axis=axis, dtype=dtype)
    rng = np.random.default_rng(5)
    m.weight[:] = rng.uniform(0.5, 2.0, 4)
    m.bias[:] = rng.standard_normal(4)
    rm, rv = np.zeros(4), np.ones(4)
    for step in range(3):
        x = shifted_normal(shape, dtype, 10 + step)
        dy = shifted_normal(shape, dtype, 20 + step)
        y = m(x)
        ry, mean, invstd, rm, rv = reference.forward(x, m.weight, m.bias, rm, rv, training=True,
                                                     momentum=0.2, axis=axis)
        _assert_close(y, ry, dtype, scale=2.0)
        _assert_close(m.running_mean, rm, dtype)
        _assert_close(m.running_var, rv, dtype)
        assert m.num_batches_tracked == step + 1
        dx = m.backward(dy)
        rdx, rgw, rgb = reference.backward(dy, x, mean, invstd, m.weight, axis=axis)
        _assert_close(dx, rdx, dtype, scale=10.0)
        _assert_close(m.grad_weight, rgw, dtype, scale=10.0)
        _assert_close(m.grad_bias, rgb, dtype, scale=10.0)
        assert y.dtype == dx.dtype == m.grad_weight.dtype == m.grad_bias.dtype == dtype

    assert m.eval() is m and m.training is False
    x = shifted_normal(shape, dtype, 99)
    dy = shifted_normal(shape, dtype, 98)
    rm_before, rv_before = m.running_mean.copy(), m.running_var.copy()
    y = m(x)
    ry, mean, invstd, _, _ = reference.forward(x, m.weight, m.bias, m.running_mean,
                                               m.running_var, training=False, axis=axis)
    _assert_close(y, ry, dtype, scale=2.0)
    np.testing.assert_array_equal(m.running_mean, rm_before)
    np.testing.assert_array_equal(m.running_var, rv_before)
    assert m.num_batches_tracked == 3
    # eval-mode backward: the running statistics are constants
    dx = m.backward(dy)
    rdx, rgw, rgb = reference.backward(dy, x, mean, invstd, m.weight, training=False, axis=axis)
    _assert_close(dx, rdx, dtype, scale=2.0)
    _assert_close(m.grad_weight, rgw, dtype, scale=10.0)
    _assert_close(m.grad_bias, rgb, dtype, scale=10.0)


def test_momentum_none_is_cumulative_average():
    m = bnc.BatchNorm1d(3, momentum=None, dtype=np.float64)
    assert m.momentum is None
    means, variances = [], []
    for step in range(4):
        x = shifted_normal((10, 3), np.float64, step) * (step + 1)
        m(x)
        means.append(x.mean(axis=0))
        variances.append(x.var(axis=0, ddof=1))
        assert m.num_batches_tracked == step + 1
        np.testing.assert_allclose(m.running_mean, np.mean(means, axis=0), rtol=1e-12)
        np.testing.assert_allclose(m.running_var, np.mean(variances, axis=0), rtol=1e-12)


def test_momentum_none_continues_from_loaded_count():
    """The factor is 1 / num_batches_tracked after the increment, also after load_state_dict."""
    m = bnc.BatchNorm1d(2, momentum=None, dtype=np.float64)
    state = m.state_dict()
    state["running_mean"] = np.array([1.0, 2.0])
    state["num_batches_tracked"] = np.array(3, dtype=np.int64)
    m.load_state_dict(state)
    x = np.array([[5.0, 6.0], [7.0, 10.0]])
    m(x)
    assert m.num_batches_tracked == 4
    np.testing.assert_allclose(m.running_mean, 0.75 * np.array([1.0, 2.0]) + 0.25 * x.mean(0))


def test_num_batches_tracked_counting():
    m = bnc.BatchNorm2d(3)
    x = shifted_normal((2, 3, 2, 2), np.float32, 0)
    m(x)
    m(x)
    assert m.num_batches_tracked == 2
    m.eval()
    m(x)
    assert m.num_batches_tracked == 2
    m.train()
    rm, rv = m.running_mean.copy(), m.running_var.copy()
    y = m(np.empty((0, 3, 2, 2), np.float32))  # an empty batch counts, as in PyTorch
    assert y.shape == (0, 3, 2, 2)
    assert m.num_batches_tracked == 3
    np.testing.assert_array_equal(m.running_mean, rm)
    np.testing.assert_array_equal(m.running_var, rv)
    assert m.state_dict()["num_batches_tracked"] == 3


def test_empty_batch_in_eval():
    m = bnc.BatchNorm1d(3).eval()
    y = m(np.empty((0, 3), np.float32))
    assert y.shape == (0, 3) and y.dtype == np.float32
    assert m.num_batches_tracked == 0


def test_train_eval_return_self_and_set_mode():
    m = bnc.BatchNorm3d(2)
    assert m.train() is m and m.training is True
    assert m.eval() is m and m.training is False
    assert m.train(True) is m and m.training is True
    assert m.train(False) is m and m.training is False
    assert m.train(mode=True).training is True


@pytest.mark.parametrize("call", ["__call__", "forward"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_nonfinite_warning_points_at_the_callers_line(call, momentum):
    """The RuntimeWarning for a channel whose statistics are not finite names the line that
    called the module (m(x) or m.forward(x)), not a line inside bnc."""
    m = bnc.BatchNorm1d(2, momentum=momentum)
    x = np.array([[1.0, np.nan], [2.0, 3.0]], np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        m(x) if call == "__call__" else m.forward(x)
    assert [w.category for w in caught] == [RuntimeWarning]
    assert "1 of 2 channels are not finite" in str(caught[0].message)
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


def test_nonfinite_warning_from_a_subclass_points_at_its_caller():
    """A subclass that overrides forward and calls the base class's: the warning names the
    subclass's line, the first outside bnc."""

    class Logged(bnc.BatchNorm1d):
        def forward(self, x):
            self.calls = getattr(self, "calls", 0) + 1
            return super().forward(x)  # the line the warning names

    m = Logged(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(np.array([[1.0, np.inf], [2.0, 3.0]], np.float32))
    assert m.calls == 1 and len(caught) == 1
    assert caught[0].filename == __file__
    assert caught[0].lineno == Logged.forward.__code__.co_firstlineno + 2


def test_backward_uses_last_forward():
    m = bnc.BatchNorm1d(3, dtype=np.float64)
    x1, x2 = shifted_normal((5, 3), np.float64, 1), shifted_normal((7, 3), np.float64, 2)
    dy = shifted_normal((7, 3), np.float64, 3)
    m(x1)
    m(x2)
    dx = m.backward(dy)
    _, mean, invstd, _, _ = reference.forward(x2)
    np.testing.assert_allclose(dx, reference.backward(dy, x2, mean, invstd)[0], rtol=1e-10,
                               atol=1e-10)
    # backward can be called again, with a different dy
    dx2 = m.backward(2 * dy)
    np.testing.assert_allclose(dx2, 2 * dx, rtol=1e-12, atol=1e-12)


def test_float16_input_into_float32_module():
    m = bnc.BatchNorm2d(3)
    x = shifted_normal((4, 3, 3, 3), np.float16, 0)
    y = m(x)
    assert y.dtype == np.float16
    dx = m.backward(np.ones_like(x))
    assert dx.dtype == np.float16 and m.grad_weight.dtype == np.float32
    np.testing.assert_allclose(y, reference.forward(x)[0], atol=1e-2)


def test_module_accepts_strided_input():
    m = bnc.BatchNorm2d(3, dtype=np.float64)
    base = shifted_normal((4, 5, 5, 6), np.float64, 0)
    x = base.transpose(0, 3, 1, 2)[:, ::2]  # (4, 3, 5, 5), non-contiguous
    y = m(x)
    np.testing.assert_allclose(y, reference.forward(x)[0], rtol=1e-10, atol=1e-10)
    dy = np.ones(x.shape)[..., ::-1]
    dx = m.backward(dy)
    assert dx.shape == x.shape


# -- state_dict ------------------------------------------------------------------------------------


def test_state_dict_is_a_copy_and_loads_back():
    m = bnc.BatchNorm2d(3)
    m(shifted_normal((4, 3, 2, 2), np.float32, 0))
    state = m.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    nbt = state["num_batches_tracked"]
    assert isinstance(nbt, np.ndarray) and nbt.shape == () and nbt.dtype == np.int64 and nbt == 1
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert not np.shares_memory(state[key], getattr(m, key))
        state[key] += 1
    m2 = bnc.BatchNorm2d(3)
    weight_obj = m2.weight
    m2.load_state_dict(state)
    assert m2.weight is weight_obj  # loaded in place
    for key in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(m2, key), getattr(m, key) + 1)
    assert m2.num_batches_tracked == 1


def _torch_module(torch, cls_name, c, dtype, **kwargs):
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    return getattr(torch.nn, cls_name)(c, dtype=tdtype, **kwargs)


CONFIGS = [
    dict(),
    dict(affine=False),
    dict(bias=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False),
    dict(momentum=None),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                               c.items()) or "default")
@pytest.mark.parametrize("cls_name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_state_dict_matches_torch(torch, cls_name, config, dtype):
    ours = getattr(bnc, cls_name)(6, dtype=dtype, **config).state_dict()
    theirs = {k: v.numpy() for k, v in _torch_module(torch, cls_name, 6, dtype,
                                                     **config).state_dict().items()}
    assert list(ours) == list(theirs)
    for key in theirs:
        assert isinstance(ours[key], np.ndarray), key
        assert ours[key].shape == theirs[key].shape, key
        assert ours[key].dtype == theirs[key].dtype, key
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "cls_name,shape,config",
    [
        ("BatchNorm1d", (8, 5), dict()),
        ("BatchNorm1d", (6, 5, 7), dict(momentum=None)),
        ("BatchNorm2d", (4, 5, 6, 6), dict()),
        ("BatchNorm2d", (4, 5, 3, 3), dict(bias=False, momentum=0.3)),
        ("BatchNorm3d", (2, 5, 3, 4, 3), dict(eps=1e-3)),
    ],
)
def test_load_torch_state_dict_gives_torch_eval_outputs(torch, cls_name, shape, config, dtype):
    torch.manual_seed(0)
    tm = _torch_module(torch, cls_name, 5, dtype, **config)
    with torch.no_grad():
        tm.weight.copy_(torch.rand(5, dtype=tm.weight.dtype) * 2 - 0.5)
        if tm.bias is not None:
            tm.bias.copy_(torch.randn(5, dtype=tm.bias.dtype))
    tm.train()
    for step in range(3):
        x = torch.randn(*shape, dtype=tm.weight.dtype) * (step + 1) + step
        tm(x).sum().backward()
    tm.eval()

    m = getattr(bnc, cls_name)(5, dtype=dtype, **config)
    m.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
    assert m.num_batches_tracked == 3
    x = shifted_normal(shape, dtype, 7)
    m.eval()
    with torch.no_grad():
        expected = tm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(m(x), expected, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
