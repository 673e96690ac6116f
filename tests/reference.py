"""Float64 NumPy reference for BatchNorm with PyTorch's semantics: the truth the tests compare to.

Deliberately simple and slow: every quantity is computed in float64 straight from its definition,
with the channel axis moved to the end, so that nothing here shares an idea with the kernels.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["forward", "backward"]


def _channels_last(a: np.ndarray, axis: int) -> np.ndarray:
    """``a`` as float64 with the channel axis moved last: shape (..., C)."""
    return np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)


def _per_channel(v: Optional[np.ndarray], channels: int, default: float) -> np.ndarray:
    if v is None:
        return np.full(channels, default, dtype=np.float64)
    return np.asarray(v, dtype=np.float64).reshape(channels)


def forward(
    x: np.ndarray,
    weight: Optional[np.ndarray] = None,
    bias: Optional[np.ndarray] = None,
    running_mean: Optional[np.ndarray] = None,
    running_var: Optional[np.ndarray] = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """Returns ``(y, save_mean, save_invstd, new_running_mean, new_running_var)``, all float64.

    Training: normalize with the batch mean and the biased batch variance; the running statistics
    (when given) become ``(1 - momentum) * running + momentum * batch`` with the unbiased variance.
    Eval: normalize with the running statistics, which are returned unchanged; ``save_mean`` is
    the running mean and ``save_invstd = 1 / sqrt(running_var + eps)``. The inputs are not modified.
    """
    xc = _channels_last(x, axis)
    channels = xc.shape[-1]
    flat = xc.reshape(-1, channels)
    n = flat.shape[0]
    w = _per_channel(weight, channels, 1.0)
    b = _per_channel(bias, channels, 0.0)
    new_rm = None if running_mean is None else _per_channel(running_mean, channels, 0.0).copy()
    new_rv = None if running_var is None else _per_channel(running_var, channels, 1.0).copy()
    if training:
        if n < 2:
            raise ValueError("reference: training needs more than 1 value per channel")
        mean = flat.mean(axis=0)
        var = ((flat - mean) ** 2).mean(axis=0)  # biased
        if new_rm is not None:
            new_rm = (1.0 - momentum) * new_rm + momentum * mean
        if new_rv is not None:
            new_rv = (1.0 - momentum) * new_rv + momentum * var * (n / (n - 1.0))
    else:
        if running_mean is None or running_var is None:
            raise ValueError("reference: eval needs running_mean and running_var")
        mean = _per_channel(running_mean, channels, 0.0)
        var = _per_channel(running_var, channels, 1.0)
    invstd = 1.0 / np.sqrt(var + eps)
    yc = (xc - mean) * invstd * w + b
    y = np.moveaxis(yc, -1, axis)
    return y, mean, invstd, new_rm, new_rv


def backward(
    dy: np.ndarray,
    x: np.ndarray,
    save_mean: np.ndarray,
    save_invstd: np.ndarray,
    weight: Optional[np.ndarray] = None,
    training: bool = True,
    axis: int = 1,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns ``(dx, grad_weight, grad_bias)``, all float64.

    Training (the statistics depend on x):
        dx = w * invstd * (dy - mean(dy) - (x - mean) * invstd**2 * mean(dy * (x - mean)))
    Eval (the statistics are constants):
        dx = w * invstd * dy
    Both: grad_weight = sum(dy * (x - mean) * invstd), grad_bias = sum(dy), over all but the
    channel axis.
    """
    dyc = _channels_last(dy, axis)
    xc = _channels_last(x, axis)
    if dyc.shape != xc.shape:
        raise ValueError("reference: dy and x differ in shape")
    channels = xc.shape[-1]
    reduce_axes = tuple(range(xc.ndim - 1))
    mean = _per_channel(save_mean, channels, 0.0)
    invstd = _per_channel(save_invstd, channels, 1.0)
    w = _per_channel(weight, channels, 1.0)
    xmu = xc - mean
    grad_bias = dyc.sum(axis=reduce_axes)
    grad_weight = (dyc * xmu * invstd).sum(axis=reduce_axes)
    if training:
        n = xc.size // channels if channels else 0
        mean_dy = grad_bias / n
        mean_dy_xmu = (dyc * xmu).sum(axis=reduce_axes) / n
        dxc = w * invstd * (dyc - mean_dy - xmu * invstd**2 * mean_dy_xmu)
    else:
        dxc = w * invstd * dyc
    dx = np.moveaxis(dxc, -1, axis)
    return dx, grad_weight, grad_bias
