"""Stateless BatchNorm on NumPy arrays: the fused calls and the split-phase building blocks.

The fused calls, ``batch_norm_forward`` and ``batch_norm_backward``, are the building blocks run
back to back in C++ while the data is in cache:

- ``batch_norm_stats`` (per-channel count, mean, m2) and ``merge_stats`` (Chan's formula over
  parts, in order): the forward's reduce;
- ``batch_norm_elemt``: the forward's apply with given statistics;
- ``batch_norm_backward_reduce`` (sum_dy, sum_dy_xmu) and ``batch_norm_backward_elemt``: the
  backward's reduce and apply.

Composed on one process they give the fused calls' results -- bit for bit where the arithmetic is
the same (docs/numerics.md says exactly where). Across processes they are SyncBatchNorm.

Checks: a bad call raises ``TypeError`` (dtype, argument type) or ``ValueError`` (shape, channels,
contiguity, ``out``, scalars) naming the argument, what was expected and what came -- and modifies
nothing. The C++ binding checks every buffer; this layer checks scalars and Python types and
normalizes (copies strided inputs once, makes the axis non-negative, allocates outputs): see
``bnc._args``.

Dtypes: ``x`` is float16, float32, float64 or bfloat16 (ml_dtypes' NumPy dtype, recognized by its
name). Per-channel arrays (weight, bias, running statistics, save_mean, save_invstd, gradients)
have x's dtype, except for float16 and bfloat16 input, whose per-channel arrays are float32 (as in
PyTorch). The split-phase statistics and sums are float64. Nothing is
cast silently.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import numpy as np

from . import _args as A
from . import _core
from .split_phase import (
    batch_norm_backward_elemt,
    batch_norm_backward_reduce,
    batch_norm_elemt,
    batch_norm_stats,
    merge_stats,
)

__all__ = [
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_stats",
    "merge_stats",
    "batch_norm_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
]

_INF = float("inf")
# param_dtype's rule for the fast path, by the input's type code.
# ("E": bfloat16, whose name the binding checks.)
_PARAM_DTYPE_BY_CHAR = {"e": np.dtype(np.float32), "f": np.dtype(np.float32),
                        "d": np.dtype(np.float64), "E": np.dtype(np.float32)}

# Names the modules use.
param_dtype = A.param_dtype
check_input = A.check_input
normalize_axis = A.normalize_axis
_check_eps = A.check_eps
_check_momentum = A.check_momentum


def _fast_path(
    x: object, axis: object, out: Optional[np.ndarray]
) -> Optional[Tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(channel axis, non-negative; the output: ``out``, or a new array like ``x``; two new
    per-channel arrays) when ``x`` and ``axis`` are of the usual kinds -- a plain non-empty
    ndarray of 2 or more dimensions and of a float type code, an int axis in range -- else None.

    The fast path hands the arrays straight to the binding, which checks every buffer before any
    kernel writes anything; whatever it refuses takes the normalizing path (copies of strided
    inputs, the binding's messages). The normalizing path costs 50-80 us right after a large call
    (cold caches), the fast path a third of that.
    """
    if type(x) is not np.ndarray or type(axis) is not int:
        return None
    ndim = x.ndim
    if ndim < 2 or not -ndim <= axis < ndim or x.size == 0:
        return None
    pdtype = _PARAM_DTYPE_BY_CHAR.get(x.dtype.char)
    if pdtype is None:
        return None
    axis %= ndim
    channels = x.shape[axis]
    result = A.POOL.empty(x.shape, x.dtype) if out is None else out
    return axis, result, np.empty(channels, pdtype), np.empty(channels, pdtype)


def _usual_scalars(eps: object, momentum: object) -> bool:
    return (type(eps) is float and 0.0 < eps < _INF
            and type(momentum) is float and -_INF < momentum < _INF)


def batch_norm_forward(
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
    out: Optional[np.ndarray] = None,
    residual: Optional[np.ndarray] = None,
    activation: Optional[str] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch normalization forward, with PyTorch's semantics.

    Args:
        x: input of shape (N, C, ...) -- or channels-last (N, ..., C) with ``axis=-1`` -- and dtype
            float16, float32, float64 or bfloat16. A non-contiguous ``x`` is copied once.
        weight, bias: (C,) scale and shift, or None (1 and 0).
        running_mean, running_var: (C,) running statistics. With ``training=True`` they are updated
            in place (if given): ``running = (1 - momentum) * running + momentum * batch``, with the
            unbiased batch variance. A channel whose batch statistics are not finite is not updated
            (a ``RuntimeWarning`` counts such channels). Required with ``training=False``.
        training: True normalizes with the batch statistics; False with the running statistics.
        momentum: weight of the batch statistics in the running update.
        eps: added to the variance; must be positive.
        axis: the channel axis (default 1; -1 for channels-last).
        out: optional C-contiguous array of x's shape and dtype to write y into (returned).
        residual: optional array of x's shape and dtype added after the normalization (a
            residual block's shortcut), in the same pass.
        activation: None, or "relu": y = max(BN(x) + residual, 0) in the same pass (NaN kept).

    Returns:
        ``(y, save_mean, save_invstd)``: y like x; save_mean and save_invstd of shape (C,), the mean
        and 1/sqrt(var + eps) used to normalize (the running ones when ``training=False``).
    """
    y, save_mean, save_invstd, skipped = _forward(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, out, residual,
        activation)
    if skipped:
        warn_skipped(skipped, save_mean.shape[0], stacklevel=3)
    return y, save_mean, save_invstd


def warn_skipped(skipped: int, channels: int, stacklevel: int = 2) -> None:
    """The RuntimeWarning for channels whose running statistics were not updated."""
    warnings.warn(
        f"bnc: batch statistics of {skipped} of {channels} channels are not finite (NaN or "
        "Inf in the input); their running statistics were not updated",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def forward_counting_skips(
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
    out: Optional[np.ndarray] = None,
    residual: Optional[np.ndarray] = None,
    activation: Optional[str] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``batch_norm_forward`` without the warning: also returns the number of channels whose
    running statistics were not updated (non-finite batch statistics), for callers that update
    their own state before warning (the modules)."""
    return _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, axis,
                    out, residual, activation)


def _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, axis, out,
             residual, activation):
    # (positional: keyword arguments cost a microsecond per call on small tensors)
    tracking = running_mean is not None or running_var is not None
    if training and tracking and (running_mean is None or running_var is None):
        # As PyTorch: half the running statistics would leave the other half stale.
        raise ValueError(
            "running_mean, running_var: expected both arrays or neither when training, got "
            + A.describe_pair(running_mean, running_var)
        )
    relu = A.check_activation(activation)
    fast = _fast_path(x, axis, out) if _usual_scalars(eps, momentum) else None
    if fast is not None and (residual is None or type(residual) is np.ndarray):
        fast_axis, y, save_mean, save_invstd = fast
        try:
            if training:
                skipped = _core.forward_train(x, y, weight, bias, running_mean, running_var,
                                              fast_axis, eps, momentum, save_mean, save_invstd,
                                              residual, relu)
            else:
                _core.forward_eval(x, y, weight, bias, running_mean, running_var, fast_axis,
                                   eps, save_mean, save_invstd, residual, relu)
                skipped = 0
        except (TypeError, ValueError):
            pass  # nothing was written: the normalizing path below copies or explains
        else:
            return y, save_mean, save_invstd, skipped if tracking else 0
    inputs = A.Inputs()
    x = inputs.tensor("x", x)
    axis = A.normalize_axis(axis, x.ndim)
    eps = A.check_eps(eps)
    momentum = A.check_momentum(momentum)
    channels = A.channels_of(x, axis)
    pdtype = A.param_dtype(x.dtype)
    weight, bias = inputs.array("weight", weight), inputs.array("bias", bias)
    if residual is not None:
        residual = inputs.tensor("residual", residual)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "running_mean, running_var: expected both arrays when training=False, got "
                + A.describe_pair(running_mean, running_var)
            )
        # Only read in eval: they may be strided or read-only.
        running_mean = inputs.array("running_mean", running_mean)
        running_var = inputs.array("running_var", running_var)
    out = A.output(out, x)
    if training:  # updated in place
        inputs.refuse_overlap(out=out, running_mean=running_mean, running_var=running_var)
    else:
        inputs.refuse_overlap(out=out)
    save_mean = np.empty(channels, pdtype)
    save_invstd = np.empty(channels, pdtype)
    if not training:
        _core.forward_eval(
            x, out, weight, bias, running_mean, running_var, axis, eps, save_mean, save_invstd,
            residual, relu,
        )
        return out, save_mean, save_invstd, 0
    # Running statistics are updated in place: the binding refuses them unless C-contiguous.
    skipped = _core.forward_train(
        x, out, weight, bias, running_mean, running_var, axis, eps, momentum, save_mean,
        save_invstd, residual, relu,
    )
    if x.size == 0:
        # Empty batch: empty output, nothing updated (as PyTorch). No statistics exist.
        save_mean.fill(np.nan)
        save_invstd.fill(np.nan)
        return out, save_mean, save_invstd, 0
    return out, save_mean, save_invstd, skipped if tracking else 0


def batch_norm_backward(
    dy: np.ndarray,
    x: np.ndarray,
    save_mean: np.ndarray,
    save_invstd: np.ndarray,
    weight: Optional[np.ndarray] = None,
    *,
    training: bool = True,
    axis: int = 1,
    out: Optional[np.ndarray] = None,
    activation: Optional[str] = None,
    y: Optional[np.ndarray] = None,
    return_residual_grad: bool = False,
) -> Tuple[np.ndarray, ...]:
    """Batch normalization backward, with PyTorch's semantics.

    Args:
        dy: gradient of the output, same shape and dtype as ``x``.
        x: the forward's input.
        save_mean, save_invstd: (C,) as returned by ``batch_norm_forward``.
        weight: (C,) scale, or None.
        training: True differentiates through the batch statistics (the forward used
            ``training=True``); False treats mean and invstd as constants (inference).
        axis: the channel axis, as in the forward.
        out: optional C-contiguous array of x's shape and dtype to write dx into (returned).
        activation: "relu" when the forward ended in its ReLU (``activation="relu"``): dy is the
            gradient of the ReLU's output and is masked by ``y > 0`` in the same pass.
        y: the forward's output (required with ``activation="relu"``).
        return_residual_grad: also return the gradient of the forward's ``residual``: the masked
            dy (written in the same pass), or, without an activation, ``dy`` itself.

    Returns:
        ``(dx, grad_weight, grad_bias)``, and ``grad_residual`` when asked: dx like x;
        grad_weight = sum(dy * (x - mean) * invstd) and grad_bias = sum(dy) over all but the
        channel axis, shape (C,).
    """
    relu = A.check_activation(activation)
    if relu and y is None:
        raise ValueError("y: expected the forward's output with activation='relu', got None")
    if not relu and y is not None:
        raise ValueError("y: expected None without an activation, got an array")
    if not isinstance(return_residual_grad, (bool, np.bool_)):
        raise TypeError("return_residual_grad: expected a bool, got "
                        f"{type(return_residual_grad).__name__}")
    fast = _fast_path(dy, axis, out) if type(x) is np.ndarray else None  # see _fast_path
    if fast is not None and (y is None or type(y) is np.ndarray):
        fast_axis, dx, grad_weight, grad_bias = fast
        grad_residual = A.POOL.empty(dy.shape, dy.dtype) if relu and return_residual_grad else None
        try:
            _core.backward(dy, x, dx, save_mean, save_invstd, weight, fast_axis, bool(training),
                           grad_weight, grad_bias, y, grad_residual)
        except (TypeError, ValueError):
            pass  # nothing was written: the normalizing path below copies or explains
        else:
            if not return_residual_grad:
                return dx, grad_weight, grad_bias
            return dx, grad_weight, grad_bias, dy if grad_residual is None else grad_residual
    inputs = A.Inputs()
    dy = inputs.tensor("dy", dy)
    x = inputs.tensor("x", x)
    axis = A.normalize_axis(axis, dy.ndim)
    channels = A.channels_of(dy, axis)
    save_mean = inputs.array("save_mean", A.required(save_mean, "save_mean", channels))
    save_invstd = inputs.array("save_invstd", A.required(save_invstd, "save_invstd", channels))
    weight = inputs.array("weight", weight)
    if y is not None:
        y = inputs.tensor("y", y)
    out = A.output(out, dy)
    inputs.refuse_overlap(out=out)
    pdtype = A.param_dtype(dy.dtype)
    grad_weight = np.empty(channels, pdtype)
    grad_bias = np.empty(channels, pdtype)
    grad_residual = A.POOL.empty(dy.shape, dy.dtype) if relu and return_residual_grad else None
    _core.backward(
        dy, x, out, save_mean, save_invstd, weight, axis, bool(training), grad_weight, grad_bias,
        y, grad_residual,
    )
    if dy.size == 0:
        grad_weight.fill(0)
        grad_bias.fill(0)
    if not return_residual_grad:
        return out, grad_weight, grad_bias
    return out, grad_weight, grad_bias, dy if grad_residual is None else grad_residual
