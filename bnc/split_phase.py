"""The split-phase building blocks of BatchNorm on NumPy arrays: the fused calls' reduce, finalize
(or exchange) and apply, one phase at a time, for statistics gathered across parts or processes
(SyncBatchNorm). ``bnc.functional`` holds the fused calls and re-exports these; the module
docstring there says how they compose, and docs/numerics.md where they match the fused calls bit
for bit.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import _args as A
from . import _core

__all__ = [
    "batch_norm_stats",
    "merge_stats",
    "batch_norm_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
]


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
