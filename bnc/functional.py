"""Stateless BatchNorm: ``batch_norm_forward`` and ``batch_norm_backward`` on NumPy arrays.

Every argument is checked here before any kernel runs, so a bad call raises ``TypeError`` (dtype)
or ``ValueError`` (shape, channels, contiguity, ``out``) naming the argument, what was expected and
what was given -- and modifies nothing. The C++ kernels (``bnc._core``) check again.

Dtypes: ``x`` is float16, float32 or float64. Per-channel arrays (weight, bias, running statistics,
save_mean, save_invstd, gradients of weight and bias) have the same dtype as ``x``, except for
float16 input, whose per-channel arrays are float32 (as in PyTorch). Nothing is cast silently.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Optional, Tuple

import numpy as np

from . import _core

__all__ = ["batch_norm_forward", "batch_norm_backward"]

_INF = float("inf")


def param_dtype(input_dtype: np.dtype) -> np.dtype:
    """The dtype of the per-channel arrays for input of ``input_dtype`` (float32 for float16)."""
    return np.dtype(np.float32) if input_dtype == np.float16 else np.dtype(input_dtype)


# param_dtype's rule for the fast path, by the input's type code.
_PARAM_DTYPE_BY_CHAR = {"e": np.dtype(np.float32), "f": np.dtype(np.float32),
                        "d": np.dtype(np.float64)}


def _fast_path(
    x: object, axis: object, out: Optional[np.ndarray]
) -> Optional[Tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(channel axis, non-negative; the output: ``out``, or a new array like ``x``; two new
    per-channel arrays) when ``x`` and ``axis`` are of the usual kinds for the fast path -- a
    plain non-empty ndarray of 2 or more dimensions and of a float type code, an int axis in
    range -- else None.

    The fast path hands the arrays straight to the binding, which checks every buffer (dtype and
    byte order, shape, contiguity, alignment, writability, overlap) before any kernel writes
    anything. Whatever it refuses goes through the checking path, which copies what may be copied
    (strided or misaligned inputs) and raises this module's messages. That checking path costs
    2 us when the interpreter is warm, but 50-80 us right after a large call (cold caches): 10-15%
    of an 8 MB inference. The fast path's own Python work costs a third of that.
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
    result = np.empty(x.shape, x.dtype) if out is None else out
    return axis, result, np.empty(channels, pdtype), np.empty(channels, pdtype)


def _describe_dtype(dtype: np.dtype) -> str:
    return str(dtype) if dtype.isnative else f"{dtype} (non-native byte order {dtype.str!r})"


def check_input(x: object, name: str = "x") -> np.ndarray:
    """Checks an input tensor and returns it C-contiguous (a strided array is copied once)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype.char not in "efd" or not x.dtype.isnative:
        raise TypeError(
            f"{name}: expected dtype float16, float32 or float64, got {_describe_dtype(x.dtype)}"
        )
    if x.ndim < 2:
        raise ValueError(f"{name}: expected at least 2 dimensions (N, C, ...), got shape {x.shape}")
    return _contiguous_aligned(x)


def _contiguous_aligned(x: np.ndarray) -> np.ndarray:
    """x itself if C-contiguous and aligned, else one copy that is."""
    if x.flags.c_contiguous and x.flags.aligned:
        return x
    return np.require(x, requirements=("C", "A"))


def normalize_axis(axis: object, ndim: int) -> int:
    """The channel axis as a non-negative index."""
    if type(axis) is int and -ndim <= axis < ndim:
        return axis % ndim
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis: expected an axis of a {ndim}-D input in [{-ndim}, {ndim}), got {axis}"
        )
    return axis % ndim


def _check_per_channel(
    array: object, name: str, channels: int, dtype: np.dtype, *, writeable: bool = False
) -> Optional[np.ndarray]:
    """Checks a per-channel array: ndarray of ``dtype`` and shape (channels,).

    Inputs may be strided (they are copied, they are small); arrays updated in place must be
    C-contiguous and writeable, because a copy would lose the update.
    """
    if array is None:
        return None
    if (type(array) is np.ndarray and array.dtype is dtype and array.shape == (channels,)
            and array.flags.c_contiguous and array.flags.aligned
            and (not writeable or array.flags.writeable)):
        return array  # the common case, checked in one go
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray or None, got {type(array).__name__}")
    if array.dtype != dtype or not array.dtype.isnative:
        raise TypeError(f"{name}: expected dtype {dtype}, got {_describe_dtype(array.dtype)}")
    if array.shape != (channels,):
        raise ValueError(f"{name}: expected shape ({channels},), got {array.shape}")
    if writeable:
        if not array.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous array (it is updated in place)")
        if not array.flags.aligned:
            raise ValueError(f"{name}: expected an aligned array (it is updated in place)")
        if not array.flags.writeable:
            raise ValueError(f"{name}: expected a writeable array (it is updated in place)")
        return array
    return _contiguous_aligned(array)


def _check_out(out: object, like: np.ndarray) -> np.ndarray:
    """Checks ``out=`` against the input ``like``; allocates it when None."""
    if out is None:
        return np.empty_like(like)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy.ndarray or None, got {type(out).__name__}")
    if out.dtype != like.dtype or not out.dtype.isnative:
        raise TypeError(f"out: expected dtype {like.dtype}, got {_describe_dtype(out.dtype)}")
    if out.shape != like.shape:
        raise ValueError(f"out: expected shape {like.shape}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError("out: expected a C-contiguous array, got a strided one")
    if not out.flags.aligned:
        raise ValueError("out: expected an array aligned to its element size, got a misaligned one")
    if not out.flags.writeable:
        raise ValueError("out: expected a writeable array, got a read-only one")
    # Overlap with the inputs (and of running buffers with each other) is checked by the binding,
    # before it writes anything, with the same kind of message.
    return out


def _check_eps(eps: object) -> float:
    if type(eps) is float and 0.0 < eps < _INF:  # the common case, without ABC checks
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    eps = float(eps)
    if not eps > 0.0 or not np.isfinite(eps):
        raise ValueError(f"eps must be positive and finite, got {eps}")
    return eps


def _check_momentum(momentum: object) -> float:
    if type(momentum) is float and -_INF < momentum < _INF:
        return momentum
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum: expected a float, got {type(momentum).__name__}")
    momentum = float(momentum)
    if not np.isfinite(momentum):
        raise ValueError(f"momentum: expected a finite float, got {momentum}")
    return momentum


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
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch normalization forward, with PyTorch's semantics.

    Args:
        x: input of shape (N, C, ...) -- or channels-last (N, ..., C) with ``axis=-1`` -- and dtype
            float16, float32 or float64. A non-contiguous ``x`` is copied once.
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

    Returns:
        ``(y, save_mean, save_invstd)``: y like x; save_mean and save_invstd of shape (C,), the mean
        and 1/sqrt(var + eps) used to normalize (the running ones when ``training=False``).
    """
    y, save_mean, save_invstd, skipped = forward_counting_skips(
        x, weight, bias, running_mean, running_var, training=training, momentum=momentum,
        eps=eps, axis=axis, out=out,
    )
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
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``batch_norm_forward`` without the warning: also returns the number of channels whose
    running statistics were not updated (non-finite batch statistics), for callers that update
    their own state before warning (the modules)."""
    fast = _fast_path(x, axis, out) if type(eps) is float and type(momentum) is float else None
    if fast is not None:
        fast_axis, y, save_mean, save_invstd = fast
        try:
            if training:
                skipped = _core.forward_train(x, y, weight, bias, running_mean, running_var,
                                              fast_axis, eps, momentum, save_mean, save_invstd)
            else:
                _core.forward_eval(x, y, weight, bias, running_mean, running_var, fast_axis,
                                   eps, save_mean, save_invstd)
                skipped = 0
        except (TypeError, ValueError):
            pass  # nothing was written: the checking path below copies or explains
        else:
            tracking = running_mean is not None or running_var is not None
            return y, save_mean, save_invstd, skipped if tracking else 0
    x = check_input(x)
    axis = normalize_axis(axis, x.ndim)
    channels = x.shape[axis]
    pdtype = param_dtype(x.dtype)
    weight = _check_per_channel(weight, "weight", channels, pdtype)
    bias = _check_per_channel(bias, "bias", channels, pdtype)
    # Updated in place when training; only read (and so may be strided or read-only) otherwise.
    running_mean = _check_per_channel(
        running_mean, "running_mean", channels, pdtype, writeable=training
    )
    running_var = _check_per_channel(
        running_var, "running_var", channels, pdtype, writeable=training
    )
    eps = _check_eps(eps)
    momentum = _check_momentum(momentum)
    if not training and (running_mean is None or running_var is None):
        raise ValueError(
            "running_mean, running_var: expected both arrays when training=False, got "
            f"{'None' if running_mean is None else 'an array'} and "
            f"{'None' if running_var is None else 'an array'}"
        )
    out = _check_out(out, x)
    save_mean = np.empty(channels, pdtype)
    save_invstd = np.empty(channels, pdtype)
    per_channel = x.size // channels if channels else 0

    if not training:
        _core.forward_eval(
            x, out, weight, bias, running_mean, running_var, axis, eps, save_mean, save_invstd
        )
        return out, save_mean, save_invstd, 0
    if per_channel == 0:
        # Empty batch: empty output, nothing updated (as PyTorch). No statistics exist.
        save_mean.fill(np.nan)
        save_invstd.fill(np.nan)
        return out, save_mean, save_invstd, 0
    if per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}"
        )
    skipped = _core.forward_train(
        x, out, weight, bias, running_mean, running_var, axis, eps, momentum, save_mean,
        save_invstd,
    )
    tracking = running_mean is not None or running_var is not None
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
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
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

    Returns:
        ``(dx, grad_weight, grad_bias)``: dx like x; grad_weight = sum(dy * (x - mean) * invstd)
        and grad_bias = sum(dy) over all but the channel axis, shape (C,).
    """
    fast = _fast_path(dy, axis, out) if type(x) is np.ndarray else None  # see _fast_path
    if fast is not None:
        fast_axis, dx, grad_weight, grad_bias = fast
        try:
            _core.backward(dy, x, dx, save_mean, save_invstd, weight, fast_axis, bool(training),
                           grad_weight, grad_bias)
        except (TypeError, ValueError):
            pass  # nothing was written: the checking path below copies or explains
        else:
            return dx, grad_weight, grad_bias
    dy = check_input(dy, "dy")
    x = check_input(x, "x")
    if x.dtype != dy.dtype:
        raise TypeError(f"x: expected dtype {dy.dtype} (the dtype of dy), got {x.dtype}")
    if x.shape != dy.shape:
        raise ValueError(f"dy: expected the shape of x {x.shape}, got {dy.shape}")
    axis = normalize_axis(axis, x.ndim)
    channels = x.shape[axis]
    pdtype = param_dtype(x.dtype)
    for name, array in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        if array is None:
            raise TypeError(f"{name}: expected a numpy.ndarray of shape ({channels},), got None")
    save_mean = _check_per_channel(save_mean, "save_mean", channels, pdtype)
    save_invstd = _check_per_channel(save_invstd, "save_invstd", channels, pdtype)
    weight = _check_per_channel(weight, "weight", channels, pdtype)
    out = _check_out(out, x)
    grad_weight = np.empty(channels, pdtype)
    grad_bias = np.empty(channels, pdtype)
    if x.size == 0:
        grad_weight.fill(0)
        grad_bias.fill(0)
        return out, grad_weight, grad_bias
    _core.backward(
        dy, x, out, save_mean, save_invstd, weight, axis, bool(training), grad_weight, grad_bias
    )
    return out, grad_weight, grad_bias
