"""Checks the float64 reference itself: its gradient against central finite differences, and a few
properties of its forward that follow from the definition."""

from __future__ import annotations

import numpy as np
import pytest
import reference

# (shape, axis): channels-first and channels-last, with and without spatial dimensions.
CASES = [
    ((5, 3), 1),
    ((4, 3), -1),
    ((3, 2, 4), 1),
    ((2, 3, 2, 3), 1),
    ((2, 2, 3, 3), -1),
    ((3, 4, 2), -1),
]


def _loss(x, w, b, rm, rv, r, training, axis, eps=1e-5):
    y = reference.forward(x, w, b, rm, rv, training=training, momentum=0.1, eps=eps, axis=axis)[0]
    return float(np.sum(y * r))


def _central_difference(f, a, h=1e-6):
    """d f / d a by central differences, element by element (a is modified and restored)."""
    grad = np.empty_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        plus = f()
        a[i] = old - h
        minus = f()
        a[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", CASES)
def test_backward_matches_finite_differences(shape, axis, training):
    rng = np.random.default_rng(1234)
    x = 1.5 + rng.standard_normal(shape)
    c = shape[axis]
    w = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    b = rng.standard_normal(c)
    rm = rng.standard_normal(c)
    rv = rng.uniform(0.5, 2.0, c)
    r = rng.standard_normal(shape)

    def loss():
        return _loss(x, w, b, rm, rv, r, training, axis)

    _, save_mean, save_invstd, _, _ = reference.forward(
        x, w, b, rm, rv, training=training, axis=axis
    )
    dx, gw, gb = reference.backward(r, x, save_mean, save_invstd, w, training=training, axis=axis)

    np.testing.assert_allclose(dx, _central_difference(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gw, _central_difference(loss, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gb, _central_difference(loss, b), rtol=1e-6, atol=1e-7)
    assert dx.shape == x.shape and gw.shape == (c,) and gb.shape == (c,)


@pytest.mark.parametrize("shape,axis", CASES[:3])
def test_backward_without_weight_is_weight_one(shape, axis):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    c = shape[axis]
    _, m, s, _, _ = reference.forward(x, axis=axis)
    a = reference.backward(dy, x, m, s, None, axis=axis)
    b = reference.backward(dy, x, m, s, np.ones(c), axis=axis)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("shape,axis", CASES)
def test_forward_training_normalizes(shape, axis):
    """Without affine, each channel of y has mean 0 and biased variance 1 / (1 + eps / var)."""
    rng = np.random.default_rng(3)
    x = 4.0 + 2.0 * rng.standard_normal(shape)
    c = shape[axis]
    rm, rv = np.zeros(c), np.ones(c)
    y, m, s, nrm, nrv = reference.forward(x, None, None, rm, rv, training=True, momentum=0.25,
                                          eps=1e-5, axis=axis)
    flat_x = np.moveaxis(x, axis, -1).reshape(-1, c)
    flat_y = np.moveaxis(y, axis, -1).reshape(-1, c)
    n = flat_x.shape[0]
    var = flat_x.var(axis=0)
    np.testing.assert_allclose(flat_y.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(flat_y.var(axis=0), var / (var + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(m, flat_x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(s, 1 / np.sqrt(var + 1e-5), rtol=1e-14)
    np.testing.assert_allclose(nrm, 0.25 * flat_x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(nrv, 0.75 + 0.25 * var * n / (n - 1), rtol=1e-14)
    # the caller's buffers are untouched
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)


def test_forward_eval_uses_running_stats():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 2))
    w, b = np.array([1.0, 2.0, -1.0]), np.array([0.5, 0.0, -0.5])
    rm, rv = np.array([0.1, -0.2, 0.3]), np.array([1.0, 4.0, 0.25])
    y, m, s, nrm, nrv = reference.forward(x, w, b, rm, rv, training=False, eps=1e-5)
    invstd = 1 / np.sqrt(rv + 1e-5)
    expected = (x - rm[:, None]) * (invstd * w)[:, None] + b[:, None]
    np.testing.assert_allclose(y, expected, rtol=1e-14)
    np.testing.assert_array_equal(m, rm)
    np.testing.assert_allclose(s, invstd, rtol=1e-15)
    np.testing.assert_array_equal(nrm, rm)
    np.testing.assert_array_equal(nrv, rv)
