"""Validation independent of layout: the same arguments get the same answer whatever their
strides. A strided input is copied before the binding sees it, so an output that overlaps the
caller's strided array must be caught before the copy hides it."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import snapshot, untouched

import bnc


def _strided(a: np.ndarray) -> np.ndarray:
    """A view of a copy of ``a`` with the same values and a step of 2 along the first axis."""
    base = np.empty((2 * a.shape[0],) + a.shape[1:], a.dtype)
    base[::2] = a
    return base[::2]


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("momentum", [float("nan"), float("inf")])
def test_momentum_checked_in_eval_whatever_the_layout(layout, momentum):
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    if layout == "strided":
        x = _strided(x)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="momentum"):
        bnc.batch_norm_forward(x, None, None, rm, rv, training=False, momentum=momentum)


def _overlapping_cases():
    """(name, call) pairs: each writes `out` into memory that a strided input of the caller
    occupies."""
    rng = np.random.default_rng(1)

    def forward(training):
        base = rng.standard_normal((16, 3)).astype(np.float32)
        x = base[::2]
        rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
        out = base[1::2] if False else base[:8]  # overlaps x's bytes
        return (base, lambda: bnc.batch_norm_forward(x, None, None, rm, rv, training=training,
                                                     out=out))

    def backward():
        base = rng.standard_normal((16, 3)).astype(np.float32)
        x = base[::2]
        dy = np.ones((8, 3), np.float32)
        mean, invstd = np.zeros(3, np.float32), np.ones(3, np.float32)
        return base, lambda: bnc.batch_norm_backward(dy, x, mean, invstd, out=base[8:])

    def backward_dy():
        base = rng.standard_normal((16, 3)).astype(np.float32)
        dy = base[::2]
        x = np.ones((8, 3), np.float32) + np.arange(3, dtype=np.float32)
        mean, invstd = np.zeros(3, np.float32), np.ones(3, np.float32)
        return base, lambda: bnc.batch_norm_backward(dy, x, mean, invstd, out=base[:8])

    def elemt():
        base = rng.standard_normal((16, 3)).astype(np.float32)
        x = base[::2]
        return base, lambda: bnc.batch_norm_elemt(x, np.zeros(3), np.ones(3), out=base[:8])

    def backward_elemt():
        base = rng.standard_normal((16, 3)).astype(np.float32)
        x = base[::2]
        dy = np.ones((8, 3), np.float32)
        z = np.zeros(3)
        return base, lambda: bnc.batch_norm_backward_elemt(dy, x, z, np.ones(3), None, z, z, 8,
                                                           out=base[:8])

    def running_stats_over_strided_weight():
        base = np.ones(6, np.float32)
        weight = base[::2]
        x = rng.standard_normal((8, 3)).astype(np.float32)
        rm = base[:3]
        return base, lambda: bnc.batch_norm_forward(x, weight, None, rm, np.ones(3, np.float32))

    return [("forward-train", lambda: forward(True)), ("forward-eval", lambda: forward(False)),
            ("backward-x", backward), ("backward-dy", backward_dy), ("elemt", elemt),
            ("backward_elemt", backward_elemt),
            ("running_mean-over-weight", running_stats_over_strided_weight)]


@pytest.mark.parametrize("name, make", _overlapping_cases(), ids=lambda v: v if
                         isinstance(v, str) else "")
def test_output_overlapping_a_strided_input_is_refused(name, make):
    base, call = make()
    before = snapshot(base)
    with pytest.raises(ValueError, match="expected memory not shared with"):
        call()
    assert untouched([base], before), f"{name}: the caller's array was written"


def test_same_answer_for_contiguous_and_strided_overlap():
    """The contiguous twin of a case above is refused by the binding with the same message."""
    base = np.random.default_rng(2).standard_normal((8, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="out: expected memory not shared with x"):
        bnc.batch_norm_forward(base, out=base)


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_half_the_running_statistics_refused_in_training(missing):
    """As PyTorch ("running_mean and running_var must either both be None or neither be None"):
    updating one and not the other would leave the module's state inconsistent."""
    x = np.random.default_rng(3).standard_normal((8, 3)).astype(np.float32)
    stats = {"running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32)}
    stats[missing] = None
    kept = next(v for v in stats.values() if v is not None)
    before = snapshot(kept)
    with pytest.raises(ValueError, match="running_mean, running_var: expected both"):
        bnc.batch_norm_forward(x, None, None, stats["running_mean"], stats["running_var"])
    assert untouched([kept], before)
