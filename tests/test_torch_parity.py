"""Parity with PyTorch: torch.nn.BatchNorm1d/2d/3d forward, running statistics and autograd.

Each case runs a few training steps and then eval steps on a bnc module and a torch module that
start from the same random weight and bias, and compares y, running_mean, running_var,
num_batches_tracked, dx, grad_weight and grad_bias after every step. Channels-last inputs
(axis=-1) are fed to torch as the permuted (N, C, ...) view. float16 input into float32 modules
is compared with torch's half input with float parameters.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers import F16, F32, case_id, make_inputs

import bnc

# (rtol, atol) per dtype
TOL = {np.float32: (1e-4, 1e-5), np.float64: (1e-9, 1e-12)}

CONFIGS = {
    "default": dict(),
    "no-affine-m0.3": dict(affine=False, momentum=0.3),
    "no-bias-cma": dict(bias=False, momentum=None),
    "no-tracking": dict(track_running_stats=False),
    "no-affine-no-tracking": dict(affine=False, track_running_stats=False),
    "cma": dict(momentum=None),
    "m0.3-eps1e-3": dict(momentum=0.3, eps=1e-3),
}

# (module, shape in bnc's layout, axis)
SHAPES = [
    ("BatchNorm1d", (8, 1), 1),
    ("BatchNorm1d", (8, 3), 1),
    ("BatchNorm1d", (6, 37), 1),
    ("BatchNorm1d", (4, 1000), 1),
    ("BatchNorm1d", (4, 3, 10), 1),  # 3-D input to BatchNorm1d
    ("BatchNorm1d", (4, 10, 3), -1),
    ("BatchNorm2d", (8, 3, 1, 1), 1),  # 1x1
    ("BatchNorm2d", (1, 3, 2, 2), 1),  # batch of one
    ("BatchNorm2d", (8, 1, 1, 3), -1),
    ("BatchNorm2d", (4, 3, 7, 7), 1),  # 7x7
    ("BatchNorm2d", (4, 7, 7, 3), -1),
    ("BatchNorm2d", (2, 37, 7, 7), 1),
    ("BatchNorm3d", (2, 3, 3, 4, 5), 1),
    ("BatchNorm3d", (2, 3, 4, 5, 3), -1),
]
# A few bigger ones, with fewer configurations.
BIG_SHAPES = [
    ("BatchNorm2d", (2, 1000, 7, 7), 1),
    ("BatchNorm2d", (2, 7, 7, 1000), -1),
    ("BatchNorm1d", (3, 1, 1000), 1),
    ("BatchNorm2d", (8, 37, 10, 10), -1),
]

def _case(cls, shape, axis, name):
    shape_id = "x".join(map(str, shape))
    return pytest.param(cls, shape, axis, name, id=f"{cls[9:]}-{shape_id}-axis{axis}-{name}")


CASES = [_case(cls, shape, axis, name) for cls, shape, axis in SHAPES for name in CONFIGS] + [
    _case(cls, shape, axis, name)
    for cls, shape, axis in BIG_SHAPES
    for name in ("default", "no-bias-cma", "no-tracking")
]


def _close(actual, expected, dtype, what, scale=1.0):
    """|actual - expected| <= rtol * |expected| + atol * scale.

    ``scale`` is sqrt(count) for sums over count elements per channel (grad_weight, grad_bias):
    PyTorch sums float32 in float32, so its own error grows with the count.
    """
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol,
                               atol=atol * scale, err_msg=what)


def _torch_input(torch, array, axis, requires_grad=False):
    """(leaf tensor in bnc's layout, tensor in torch's (N, C, ...) layout)."""
    leaf = torch.from_numpy(array.copy())
    if requires_grad:
        leaf.requires_grad_(True)
    return leaf, (leaf.movedim(-1, 1) if axis == -1 and array.ndim > 2 else leaf)


def run_parity(torch, cls_name, shape, axis, config, dtype, train_steps=3, eval_steps=2, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    tm = getattr(torch.nn, cls_name)(c, dtype=tdtype, **config)
    m = getattr(bnc, cls_name)(c, axis=axis, dtype=dtype, **config)
    if m.weight is not None:
        m.weight[:] = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
        with torch.no_grad():
            tm.weight.copy_(torch.from_numpy(m.weight))
    if m.bias is not None:
        m.bias[:] = rng.standard_normal(c)
        with torch.no_grad():
            tm.bias.copy_(torch.from_numpy(m.bias))
    assert (tm.weight is None) == (m.weight is None)
    assert (tm.bias is None) == (m.bias is None)

    sum_scale = np.sqrt(np.prod(shape) / c)
    for step in range(train_steps + eval_steps):
        training = step < train_steps
        tm.train(training)
        assert m.train(training) is m
        what = f"step {step} ({'train' if training else 'eval'})"
        x = (step - 1.0 + (1.0 + step) * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)

        tm.zero_grad(set_to_none=True)
        x_leaf, x_t = _torch_input(torch, x, axis, requires_grad=True)
        _, dy_t = _torch_input(torch, dy, axis)
        y_t = tm(x_t)
        y_t.backward(dy_t)
        y_expected = y_t.detach()
        if axis == -1 and x.ndim > 2:
            y_expected = y_expected.movedim(1, -1)

        y = m(x)
        assert y.shape == x.shape and y.dtype == dtype
        _close(y, y_expected.numpy(), dtype, f"y, {what}")
        if tm.running_mean is None:
            assert m.running_mean is None and m.running_var is None
            assert m.num_batches_tracked is None
        else:
            _close(m.running_mean, tm.running_mean.numpy(), dtype, f"running_mean, {what}")
            _close(m.running_var, tm.running_var.numpy(), dtype, f"running_var, {what}")
            assert m.num_batches_tracked == int(tm.num_batches_tracked), what

        dx = m.backward(dy)
        assert dx.shape == x.shape and dx.dtype == dtype
        _close(dx, x_leaf.grad.numpy(), dtype, f"dx, {what}")
        if tm.weight is None:
            assert m.grad_weight is None
        else:
            _close(m.grad_weight, tm.weight.grad.numpy(), dtype, f"grad_weight, {what}",
                   sum_scale)
        if tm.bias is None:
            assert m.grad_bias is None
        else:
            _close(m.grad_bias, tm.bias.grad.numpy(), dtype, f"grad_bias, {what}", sum_scale)

    # the whole state, as torch has it
    ours = m.state_dict()
    theirs = {k: v.numpy() for k, v in tm.state_dict().items()}
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape
        _close(ours[key], theirs[key], dtype, f"state_dict[{key!r}]")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cls_name,shape,axis,config_name", CASES)
def test_parity_with_torch(torch, cls_name, shape, axis, config_name, dtype):
    run_parity(torch, cls_name, shape, axis, CONFIGS[config_name], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_parity_eval_from_fresh_module(torch, dtype):
    """Eval before any training uses the initial running statistics (mean 0, var 1)."""
    run_parity(torch, "BatchNorm2d", (4, 5, 3, 3), 1, {}, dtype, train_steps=0, eval_steps=2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_parity_functional_with_torch(torch, dtype):
    """bnc.batch_norm_forward/backward against torch.nn.functional.batch_norm and autograd."""
    rng = np.random.default_rng(3)
    x = (2 + rng.standard_normal((6, 4, 5, 5))).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w = rng.uniform(0.5, 2, 4).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    rm, rv = rng.standard_normal(4).astype(dtype), rng.uniform(1, 2, 4).astype(dtype)
    for training in (True, False):
        rm_t, rv_t = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        x_t = torch.from_numpy(x.copy()).requires_grad_(True)
        w_t = torch.from_numpy(w.copy()).requires_grad_(True)
        b_t = torch.from_numpy(b.copy()).requires_grad_(True)
        y_t = torch.nn.functional.batch_norm(x_t, rm_t, rv_t, w_t, b_t, training=training,
                                             momentum=0.2, eps=1e-4)
        y_t.backward(torch.from_numpy(dy))
        rm_b, rv_b = rm.copy(), rv.copy()
        y, sm, si = bnc.batch_norm_forward(x, w, b, rm_b, rv_b, training=training, momentum=0.2,
                                           eps=1e-4)
        dx, gw, gb = bnc.batch_norm_backward(dy, x, sm, si, w, training=training)
        _close(y, y_t.detach().numpy(), dtype, "y")
        _close(rm_b, rm_t.numpy(), dtype, "running_mean")
        _close(rv_b, rv_t.numpy(), dtype, "running_var")
        _close(dx, x_t.grad.numpy(), dtype, "dx")
        _close(gw, w_t.grad.numpy(), dtype, "grad_weight", np.sqrt(x.size / 4))
        _close(gb, b_t.grad.numpy(), dtype, "grad_bias", np.sqrt(x.size / 4))


def test_torch_fixture_fails_under_ci_and_skips_otherwise(torch_importer, monkeypatch):
    """Without torch, the parity tests fail when CI is set and are skipped otherwise."""
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    monkeypatch.setenv("CI", "true")
    missing = torch_importer()
    assert type(missing).__name__ == "TorchMissing"
    assert "torch is required when CI is set" in missing.message
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="torch is not installed"):
        torch_importer()


# -- float16 input, float32 parameters -------------------------------------------------------------


@pytest.mark.parametrize("cls_name,shape,axis",
                         [("BatchNorm2d", (8, 4, 6, 6), 1), ("BatchNorm2d", (8, 6, 6, 4), -1),
                          ("BatchNorm1d", (16, 5), 1), ("BatchNorm1d", (4, 3, 130), 1)],
                         ids=lambda v: case_id(v) if not isinstance(v, str) else v)
def test_float16_module_parity_with_torch(torch, cls_name, shape, axis):
    """float32 module on float16 input, against torch.nn.BatchNorm* (float32 parameters) on
    the same float16 tensor -- torch supports half input with float parameters on CPU."""
    c = shape[axis]
    x, dy, w, b, _, _ = make_inputs(shape, axis, F16, seed=95 + c, offset=0.5)
    m = getattr(bnc, cls_name)(c, axis=axis, momentum=0.3)
    tm = getattr(torch.nn, cls_name)(c, momentum=0.3)
    m.weight[:] = w
    m.bias[:] = b
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(w))
        tm.bias.copy_(torch.from_numpy(b))

    def to_torch(a):
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.movedim(-1, 1) if axis == -1 else t

    def from_torch(t):
        t = t.detach()
        return (t.movedim(1, -1) if axis == -1 else t).contiguous().numpy()

    for step in range(2):
        xs = (x + F16(step)).astype(F16)
        tx = to_torch(xs).requires_grad_(True)
        ty = tm(tx)
        assert ty.dtype == torch.float16, "torch did not keep half output for half input"
        y = m(xs)
        assert y.dtype == F16
        np.testing.assert_allclose(y, from_torch(ty), rtol=1e-3, atol=2e-3, err_msg="y")
        np.testing.assert_allclose(m.running_mean, tm.running_mean.numpy(), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(m.running_var, tm.running_var.numpy(), rtol=1e-5, atol=1e-6)
        assert m.num_batches_tracked == int(tm.num_batches_tracked)
        tm.zero_grad()
        ty.backward(to_torch(dy))
        dx = m.backward(dy)
        assert dx.dtype == F16 and m.grad_weight.dtype == F32 and m.grad_bias.dtype == F32
        tdx = from_torch(tx.grad)
        np.testing.assert_allclose(dx, tdx, rtol=1e-3, atol=2e-3 * max(1.0, np.abs(tdx).max()),
                                   err_msg="dx")
        n = x.size // c
        np.testing.assert_allclose(m.grad_weight, tm.weight.grad.numpy(), rtol=1e-3,
                                   atol=1e-3 * np.sqrt(n), err_msg="grad_weight")
        np.testing.assert_allclose(m.grad_bias, tm.bias.grad.numpy(), rtol=1e-4,
                                   atol=1e-5 * np.sqrt(n), err_msg="grad_bias")
    m.eval()
    tm.eval()
    with torch.no_grad():
        ty = tm(to_torch(x))
    assert ty.dtype == torch.float16
    np.testing.assert_allclose(m(x), from_torch(ty), rtol=1e-3, atol=2e-3, err_msg="eval y")
