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
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import _args as A
from . import _core

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
    y, save_mean, save_invstd, skipped = forward_counting_skips(
        x, weight, bias, running_mean, running_var, training=training, momentum=momentum,
        eps=eps, axis=axis, out=out, residual=residual, activation=activation,
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
    residual: Optional[np.ndarray] = None,
    activation: Optional[str] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``batch_norm_forward`` without the warning: also returns the number of channels whose
    running statistics were not updated (non-finite batch statistics), for callers that update
    their own state before warning (the modules)."""
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


# -- split-phase building blocks ------------------------------------------------------------------


def batch_norm_stats(x: np.ndarray, *, axis: int = 1) -> Tuple[int, np.ndarray, np.ndarray]:
    """Per-channel statistics of ``x``: the training forward's reduce, nothing applied.

    Args:
        x: (N, C, ...) or channels-last with ``axis=-1``; float16, float32, float64 or bfloat16.
        axis: the channel axis.

    Returns:
        ``(count, mean, m2)``: ``count`` (int) elements per channel; ``mean`` and
        ``m2`` = sum((x - mean)^2) as float64 arrays of shape (C,), from the same pivoted sums as
        ``batch_norm_forward`` (the same mean, bit for bit). An empty batch gives count 0 and
        zeros; a channel with NaN or Inf gives a non-finite mean or m2.
    """
    x = A.tensor(x)
    axis = A.normalize_axis(axis, x.ndim)
    channels = A.channels_of(x, axis)
    mean = np.empty(channels, np.float64)
    m2 = np.empty(channels, np.float64)
    _core.stats(x, mean, m2, axis)
    count = x.size // channels if channels else 0
    if count == 0:
        mean.fill(0.0)
        m2.fill(0.0)
    return count, mean, m2


def _stack_rows(rows: object, name: str) -> np.ndarray:
    """(R, C) float64 from an ndarray or a sequence of (C,) float64 arrays; nothing is cast."""
    if isinstance(rows, np.ndarray):
        array = rows
    elif isinstance(rows, (list, tuple)):
        for i, row in enumerate(rows):
            if not isinstance(row, np.ndarray):
                raise TypeError(f"{name}: expected float64 arrays, got {type(row).__name__} "
                                f"in row {i}")
            if row.dtype != np.float64:
                raise TypeError(f"{name}: expected dtype float64, got {row.dtype} in row {i}")
            if row.ndim != 1 or row.shape != rows[0].shape:
                raise ValueError(f"{name}: expected rows of equal shape (C,), got "
                                 f"{[np.shape(r) for r in rows]}")
        array = np.stack(rows) if rows else np.empty((0, 0))
    else:
        raise TypeError(f"{name}: expected a numpy.ndarray of shape (R, C), got "
                        f"{type(rows).__name__}")
    if array.dtype != np.float64:
        raise TypeError(f"{name}: expected dtype float64, got {A.describe_dtype(array.dtype)}")
    if array.ndim != 2:
        raise ValueError(f"{name}: expected shape (R, C), got {array.shape}")
    return array


def merge_stats(
    counts: Union[Sequence[int], np.ndarray], means: np.ndarray, m2s: np.ndarray
) -> Tuple[int, np.ndarray, np.ndarray]:
    """Merges per-part statistics (``batch_norm_stats`` of each part) with Chan's formula.

    Args:
        counts: R non-negative ints, the elements per channel of each part.
        means, m2s: (R, C) float64 (or sequences of R float64 (C,) arrays).

    Returns:
        ``(count, mean, m2)`` of the union of the parts. Rows are merged in the order given and
        rows of count 0 are skipped, so the result is deterministic: the same rows in the same
        order give the same bits on every process.
    """
    means = _stack_rows(means, "means")
    m2s = _stack_rows(m2s, "m2s")
    if m2s.shape != means.shape:
        raise ValueError(f"m2s: expected the shape of means {means.shape}, got {m2s.shape}")
    if isinstance(counts, np.ndarray):
        if counts.dtype.kind not in "iu":
            raise TypeError(f"counts: expected integers, got dtype {counts.dtype}")
        counts = counts.tolist() if counts.ndim == 1 else counts
    if not isinstance(counts, (list, tuple)):
        raise TypeError(f"counts: expected a sequence of ints, got {type(counts).__name__}")
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise TypeError(f"counts: expected ints, got {type(c).__name__}")
        if c < 0:
            raise ValueError(f"counts: expected non-negative counts, got {c}")
    if len(counts) != means.shape[0]:
        raise ValueError(f"counts: expected {means.shape[0]} counts (one per row of means), "
                         f"got {len(counts)}")
    channels = means.shape[1]
    total = 0
    mean = np.zeros(channels, np.float64)
    m2 = np.zeros(channels, np.float64)
    for n_b, mean_b, m2_b in zip(counts, means, m2s):
        n_b = int(n_b)
        if n_b == 0:
            continue
        if total == 0:
            total, mean, m2 = n_b, mean_b.copy(), m2_b.copy()
            continue
        n = total + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + m2_b + delta * delta * (total * (n_b / n))
        total = n
    return total, mean, m2


def batch_norm_elemt(
    x: np.ndarray,
    mean: np.ndarray,
    invstd: np.ndarray,
    weight: Optional[np.ndarray] = None,
    bias: Optional[np.ndarray] = None,
    *,
    axis: int = 1,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """The forward's apply with given statistics: y = (x - mean) * invstd * weight + bias.

    ``mean`` and ``invstd`` are (C,) float64 or x's per-channel dtype; ``weight`` and ``bias``
    x's per-channel dtype or None. Given the forward's own float64 statistics it gives the
    forward's y bit for bit. ``out`` as in ``batch_norm_forward``.
    """
    inputs = A.Inputs()
    x = inputs.tensor("x", x)
    axis = A.normalize_axis(axis, x.ndim)
    mean = inputs.statistics("mean", mean, x.dtype)
    invstd = inputs.statistics("invstd", invstd, x.dtype)
    weight, bias = inputs.array("weight", weight), inputs.array("bias", bias)
    out = A.output(out, x)
    inputs.refuse_overlap(out=out)
    _core.elemt(x, out, mean, invstd, weight, bias, axis)
    return out


def batch_norm_backward_reduce(
    dy: np.ndarray, x: np.ndarray, mean: np.ndarray, invstd: np.ndarray, *, axis: int = 1
) -> Tuple[np.ndarray, np.ndarray]:
    """The backward's reduce: ``(sum_dy, sum_dy_xmu)``, float64 (C,), the sums of dy and of
    dy * (x - mean) per channel. ``invstd`` is checked like ``mean`` (float64 or the per-channel
    dtype, shape (C,)) but does not enter the sums; grad_weight is ``sum_dy_xmu * invstd`` and
    grad_bias ``sum_dy``."""
    dy = A.tensor(dy, "dy")
    x = A.tensor(x, "x")
    axis = A.normalize_axis(axis, dy.ndim)
    channels = A.channels_of(dy, axis)
    mean = A.statistics(mean, "mean", dy.dtype)
    invstd = A.statistics(invstd, "invstd", dy.dtype)
    sum_dy = np.empty(channels, np.float64)
    sum_dy_xmu = np.empty(channels, np.float64)
    _core.backward_reduce(dy, x, mean, invstd, sum_dy, sum_dy_xmu, axis)
    return sum_dy, sum_dy_xmu


def batch_norm_backward_elemt(
    dy: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    invstd: np.ndarray,
    weight: Optional[np.ndarray],
    sum_dy: np.ndarray,
    sum_dy_xmu: np.ndarray,
    count: int,
    *,
    axis: int = 1,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """The backward's apply with given sums:
    dx = weight * invstd * (dy - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count).

    ``count`` is the number of elements per channel over all parts of the batch (the sums are
    over all parts too); ``weight`` may be None. Statistics and sums are (C,) float64 or the
    per-channel dtype. With the sums of ``batch_norm_backward_reduce`` over the whole batch it
    gives ``batch_norm_backward``'s dx bit for bit.
    """
    inputs = A.Inputs()
    dy = inputs.tensor("dy", dy)
    x = inputs.tensor("x", x)
    axis = A.normalize_axis(axis, dy.ndim)
    count = A.check_count(count)
    mean = inputs.statistics("mean", mean, dy.dtype)
    invstd = inputs.statistics("invstd", invstd, dy.dtype)
    sum_dy = inputs.statistics("sum_dy", sum_dy, dy.dtype)
    sum_dy_xmu = inputs.statistics("sum_dy_xmu", sum_dy_xmu, dy.dtype)
    weight = inputs.array("weight", weight)
    out = A.output(out, dy)
    inputs.refuse_overlap(out=out)
    _core.backward_elemt(dy, x, out, mean, invstd, weight, sum_dy, sum_dy_xmu,
                         float(count), axis)
    return out
