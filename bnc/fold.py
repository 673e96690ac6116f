"""Folding an inference BatchNorm into the linear layer before it: a convolution, a transposed
convolution or a fully connected layer followed by BN(eval) is the same layer with scaled weights
and a shifted bias, and the BN costs nothing at inference.

BN(z) = (z - running_mean) * s + bn_bias with s = bn_weight / sqrt(running_var + eps), per output
channel c of the layer. So W' = W scaled by s along the output channels and b' = (b - running_mean)
* s + bn_bias. Which axis of W holds the output channels depends on the layer: axis 0 for
convolutions (Cout, Cin / groups, *k) and linear layers (out, in); for transposed convolutions
(Cin, Cout / groups, *k) output channel g * (Cout / groups) + j is W[i, j] for every input channel
i of group g -- with groups > 1 the scale is per (group, j), which a plain reshape along axis 1
gets wrong (torch's fuse_conv_bn_weights raises there: pytorch #180995).
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import numpy as np

from . import _args as A

_LAYERS = ("conv", "conv_transpose", "linear")


def _vector(a: object, name: str, channels: int) -> Optional[np.ndarray]:
    if a is None:
        return None
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray or None, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float dtype, got {a.dtype}")
    if a.shape != (channels,):
        raise ValueError(f"{name}: expected shape ({channels},) (the layer's output channels), "
                         f"got {a.shape}")
    return a.astype(np.float64)


def fold_batch_norm(
    weight: np.ndarray,
    bias: Optional[np.ndarray],
    running_mean: np.ndarray,
    running_var: np.ndarray,
    bn_weight: Optional[np.ndarray] = None,
    bn_bias: Optional[np.ndarray] = None,
    eps: float = 1e-5,
    *,
    layer: str = "conv",
    groups: int = 1,
) -> Tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of the layer with the inference BatchNorm after it folded in.

    Args:
        weight: the layer's weight: (Cout, Cin / groups, *kernel) for layer="conv", (Cin,
            Cout / groups, *kernel) for "conv_transpose", (out, in) for "linear".
        bias: the layer's bias (Cout,), or None (zero).
        running_mean, running_var, bn_weight, bn_bias, eps: the BatchNorm's (bn_weight and
            bn_bias None: 1 and 0).
        layer: "conv", "conv_transpose" or "linear".
        groups: the convolution's groups.

    Returns new arrays (nothing given is modified) in weight's dtype; computed in float64.
    """
    if not isinstance(weight, np.ndarray):
        raise TypeError(f"weight: expected a numpy.ndarray, got {type(weight).__name__}")
    if weight.dtype.kind != "f":
        raise TypeError(f"weight: expected a float dtype, got {weight.dtype}")
    if layer not in _LAYERS:
        raise ValueError(f"layer: expected one of {', '.join(map(repr, _LAYERS))}, got {layer!r}")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    groups = int(groups)
    eps = A.check_eps(eps)
    if layer == "linear":
        if weight.ndim != 2 or groups != 1:
            raise ValueError(f"weight: expected (out, in) for a linear layer (groups 1), got shape "
                             f"{weight.shape} and groups {groups}")
        channels = weight.shape[0]
    elif weight.ndim < 3:
        raise ValueError(f"weight: expected a convolution's weight of 3 or more dimensions, got "
                         f"shape {weight.shape}")
    elif layer == "conv":
        if weight.shape[0] % groups:
            raise ValueError(f"weight: expected output channels ({weight.shape[0]}) divisible by "
                             f"groups ({groups})")
        channels = weight.shape[0]
    else:
        if weight.shape[0] % groups:
            raise ValueError(f"weight: expected input channels ({weight.shape[0]}) divisible by "
                             f"groups ({groups})")
        channels = weight.shape[1] * groups
    mean = _vector(running_mean, "running_mean", channels)
    var = _vector(running_var, "running_var", channels)
    if mean is None or var is None:
        raise TypeError("running_mean, running_var: expected arrays, got None")
    gamma = _vector(bn_weight, "bn_weight", channels)
    beta = _vector(bn_bias, "bn_bias", channels)
    b = _vector(bias, "bias", channels)
    scale = 1.0 / np.sqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    new_bias = ((0.0 if b is None else b) - mean) * scale + (0.0 if beta is None else beta)
    w = weight.astype(np.float64)
    if layer == "conv_transpose":
        cin, per_group = weight.shape[0], weight.shape[1]
        # output channel g * per_group + j  <-  weight[i, j] for i in group g
        s = scale.reshape(groups, 1, per_group)  # (g, 1, j)
        w = (w.reshape(groups, cin // groups, per_group, -1) * s[..., None]).reshape(weight.shape)
    else:
        w = w * scale.reshape((channels,) + (1,) * (weight.ndim - 1))
    return w.astype(weight.dtype), new_bias.astype(weight.dtype)
