"""BatchNorm in plain NumPy, as a NumPy user would write it: the baseline of ``python -m bnc`` and
of the benchmark (and, on float64 copies, the demo's reference). Same semantics as bnc."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def _reduce_axes(ndim: int, axis: int) -> Tuple[int, ...]:
    return tuple(d for d in range(ndim) if d != axis % ndim)


def _per_channel(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis % ndim] = v.shape[0]
    return v.reshape(shape)


def forward(
    x: np.ndarray,
    weight: Optional[np.ndarray] = None,
    bias: Optional[np.ndarray] = None,
    running_mean: Optional[np.ndarray] = None,
    running_var: Optional[np.ndarray] = None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, save_mean, save_invstd); running statistics updated in place when training."""
    axes = _reduce_axes(x.ndim, axis)
    if training:
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
        n = x.size // x.shape[axis]
        if running_mean is not None:
            running_mean *= 1 - momentum
            running_mean += momentum * mean
        if running_var is not None:
            running_var *= 1 - momentum
            running_var += momentum * var * (n / (n - 1))
    else:
        mean, var = running_mean, running_var
    invstd = 1 / np.sqrt(var + eps)
    scale = invstd if weight is None else invstd * weight
    y = (x - _per_channel(mean, x.ndim, axis)) * _per_channel(scale, x.ndim, axis)
    if bias is not None:
        y += _per_channel(bias, x.ndim, axis)
    return y, mean, invstd


def backward(
    dy: np.ndarray,
    x: np.ndarray,
    save_mean: np.ndarray,
    save_invstd: np.ndarray,
    weight: Optional[np.ndarray] = None,
    *,
    training: bool = True,
    axis: int = 1,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, grad_weight, grad_bias)."""
    axes = _reduce_axes(x.ndim, axis)
    n = x.size // x.shape[axis]
    mean = _per_channel(save_mean, x.ndim, axis)
    invstd = _per_channel(save_invstd, x.ndim, axis)
    x_mu = x - mean
    grad_bias = dy.sum(axis=axes)
    dot = (dy * x_mu).sum(axis=axes)
    grad_weight = dot * save_invstd
    scale = invstd if weight is None else invstd * _per_channel(weight, x.ndim, axis)
    if training:
        dx = (dy - _per_channel(grad_bias / n, x.ndim, axis)
              - x_mu * invstd * invstd * _per_channel(dot / n, x.ndim, axis)) * scale
    else:
        dx = dy * scale
    return dx, grad_weight, grad_bias
