"""Argument handling of the functional layer: scalar and type checks, and normalization.

One owner per check: the C++ binding (``bnc._core``) checks every buffer -- dtype and byte order,
shape, contiguity, alignment, writability, overlap -- before any kernel writes anything, and its
messages name the argument. This module checks what the binding cannot see or must not decide:
Python types and scalars (eps, momentum, count, axis), and it normalizes: strided or misaligned
inputs are copied once, the axis is made non-negative, outputs are allocated.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import numpy as np

from ._pool import POOL

_INF = float("inf")


# The input dtypes, as messages name them.
FLOAT_DTYPES = "float16, float32, float64 or bfloat16"


def is_bfloat16(dtype: np.dtype) -> bool:
    """ml_dtypes' bfloat16 (recognized by its name: bnc does not depend on ml_dtypes)."""
    return dtype.char == "E" and dtype.itemsize == 2 and dtype.name == "bfloat16"


def param_dtype(input_dtype: np.dtype) -> np.dtype:
    """The dtype of the per-channel arrays for input of ``input_dtype`` (float32 for float16 and
    bfloat16)."""
    if input_dtype == np.float16 or is_bfloat16(np.dtype(input_dtype)):
        return np.dtype(np.float32)
    return np.dtype(input_dtype)


def describe_dtype(dtype: np.dtype) -> str:
    return str(dtype) if dtype.isnative else f"{dtype} (non-native byte order {dtype.str!r})"


def tensor(x: object, name: str = "x") -> np.ndarray:
    """An input tensor as the binding takes it: an ndarray (else TypeError), C-contiguous and
    aligned (a strided or misaligned array is copied once)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    return contiguous(x)


def contiguous(a: object) -> object:
    """``a`` itself unless it is an ndarray that is not C-contiguous and aligned: then one copy
    that is. Anything else goes to the binding as it is (and gets its message there)."""
    if not isinstance(a, np.ndarray):
        return a
    if a.flags.c_contiguous and a.flags.aligned:
        return a
    return np.require(a, requirements=("C", "A"))


def check_input(x: object, name: str = "x") -> np.ndarray:
    """An input tensor for a module: an ndarray of a float dtype with at least 2 dimensions
    (the module compares its dtype with its own before the binding sees it), C-contiguous."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if not (x.dtype.char in "efd" or is_bfloat16(x.dtype)) or not x.dtype.isnative:
        raise TypeError(f"{name}: expected dtype {FLOAT_DTYPES}, got {describe_dtype(x.dtype)}")
    if x.ndim < 2:
        raise ValueError(f"{name}: expected at least 2 dimensions (N, C, ...), got shape {x.shape}")
    return contiguous(x)


def normalize_axis(axis: object, ndim: int) -> int:
    """The channel axis as a non-negative index. For input of fewer than 2 dimensions the axis is
    passed on as it is: the binding refuses the input's shape first."""
    if type(axis) is int and -ndim <= axis < ndim:
        return axis % ndim
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
    axis = int(axis)
    if ndim < 2:
        return 0
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis: expected an axis of a {ndim}-D input in [{-ndim}, {ndim}), got {axis}"
        )
    return axis % ndim


def channels_of(x: np.ndarray, axis: int) -> int:
    return x.shape[axis] if x.ndim >= 2 else 0


def output(out: object, like: np.ndarray) -> object:
    """``out`` as given (the binding checks it), or a new array like ``like``."""
    if out is None:
        return POOL.empty(like.shape, like.dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy.ndarray or None, got {type(out).__name__}")
    return out


def statistics(array: object, name: str, x_dtype: np.dtype) -> object:
    """Per-channel statistics given to a split-phase block: float64, or x's per-channel dtype
    (widened to float64 exactly, once). Other arrays go to the binding, which names the
    argument."""
    if isinstance(array, np.ndarray) and array.dtype != np.float64:
        if array.dtype == param_dtype(x_dtype) and array.dtype.isnative:
            return array.astype(np.float64)
        raise TypeError(
            f"{name}: expected dtype float64 or {param_dtype(x_dtype)}, got "
            f"{describe_dtype(array.dtype)}"
        )
    return contiguous(array)


class Inputs:
    """The caller's input arrays as the binding takes them (``tensor``, ``array``,
    ``statistics``), remembering those that were copied: an output that overlaps one of them is
    refused (``refuse_overlap``), since the binding sees only the copy and would write into the
    caller's array unnoticed. The same test as the binding's: by byte ranges."""

    def __init__(self) -> None:
        self._copied: Dict[str, np.ndarray] = {}

    def _keep(self, name: str, given: object, normalized: object) -> object:
        if normalized is not given and isinstance(given, np.ndarray):
            self._copied[name] = given
        return normalized

    def tensor(self, name: str, x: object) -> np.ndarray:
        return self._keep(name, x, tensor(x, name))

    def array(self, name: str, a: object) -> object:
        return self._keep(name, a, contiguous(a))

    def statistics(self, name: str, a: object, x_dtype: np.dtype) -> object:
        return self._keep(name, a, statistics(a, name, x_dtype))

    def refuse_overlap(self, **outputs: object) -> None:
        for in_name, given in self._copied.items():
            for out_name, out in outputs.items():
                if isinstance(out, np.ndarray) and np.may_share_memory(out, given):
                    raise ValueError(f"{out_name}: expected memory not shared with {in_name}, "
                                     "got an overlapping array")


def check_activation(activation: object) -> bool:
    """Whether `activation` is "relu" (None: no activation); anything else is refused."""
    if activation is None:
        return False
    if isinstance(activation, str) and activation == "relu":
        return True
    raise ValueError(f"activation: expected None or 'relu', got {activation!r}")


def describe_pair(first: object, second: object) -> str:
    """'None and an array' and the like, for messages about two arguments given together."""
    return " and ".join("None" if a is None else "an array" for a in (first, second))


def _real_as_float(value: numbers.Real) -> Tuple[float, str]:
    """``float(value)`` and the text a message shows for it. A number beyond the float range
    (``10**400``: ``float()`` raises OverflowError) is ±inf here, shown by its magnitude rather
    than by its hundreds of digits (``str()`` refuses ints of over 4300)."""
    try:
        as_float = float(value)
    except OverflowError:
        return (_INF if value > 0 else -_INF), _beyond_float(value)
    return as_float, str(as_float)


def _beyond_float(value: numbers.Real) -> str:
    name = type(value).__name__
    text = f"{'an' if name[0] in 'aeiou' else 'a'} {name} beyond the float range"
    if not isinstance(value, numbers.Rational):
        return text
    # math.log10 takes ints of any size
    exponent = math.log10(abs(value.numerator)) - math.log10(value.denominator)
    power = math.floor(exponent)
    mantissa = round(10.0 ** (exponent - power))
    if mantissa == 10:
        mantissa, power = 1, power + 1
    return f"{text} (about {'-' if value < 0 else ''}{mantissa}e+{power})"


def check_eps(eps: object) -> float:
    if type(eps) is float and 0.0 < eps < _INF:  # the common case, without ABC checks
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    value, shown = _real_as_float(eps)
    if not 0.0 < value < _INF:
        raise ValueError(f"eps must be positive and finite, got {shown}")
    return value


def check_momentum(momentum: object) -> float:
    if type(momentum) is float and -_INF < momentum < _INF:
        return momentum
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum: expected a float, got {type(momentum).__name__}")
    value, shown = _real_as_float(momentum)
    if not -_INF < value < _INF:
        raise ValueError(f"momentum: expected a finite float, got {shown}")
    return value


def check_count(count: object) -> int:
    """The number of elements per channel over all parts of a batch: a positive int."""
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
        raise TypeError(f"count: expected an int, got {type(count).__name__}")
    if count < 1:
        raise ValueError(f"count: expected a positive number of elements per channel, got {count}")
    return int(count)


def required(array: Optional[object], name: str, channels: int) -> object:
    if array is None:
        raise TypeError(f"{name}: expected a numpy.ndarray of shape ({channels},), got None")
    return array
