"""BatchNorm1d/2d/3d: thin stateful wrappers over ``bnc.functional`` with PyTorch's semantics.

A module keeps weight (gamma), bias (beta), the running statistics and what its last forward saved
for ``backward``. All computation is in ``bnc.functional`` and the C++ kernels.
"""

from __future__ import annotations

import numbers
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import _args as A
from . import functional as F
from .fold import fold_batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

_MODULE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INT64_MAX = int(np.iinfo(np.int64).max)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` with which ``F.warn_skipped``, called by ``forward``, names the first
    frame outside this file: the user's ``m(x)`` goes through ``__call__``, ``m.forward(x)``
    does not, and Python 3.9 has no ``skip_file_prefixes``."""
    this_file = sys._getframe(1).f_code.co_filename  # forward's
    level, frame = 3, sys._getframe(2)  # 1: warn_skipped, 2: forward, 3: forward's caller
    while frame is not None and frame.f_code.co_filename == this_file:
        level, frame = level + 1, frame.f_back
    return level


class _BatchNorm:
    """Base class; subclasses set the accepted input dimensionalities."""

    _ndims: Tuple[int, ...] = ()
    _ndims_text = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        bias: bool = True,
        axis: int = 1,
        dtype: object = np.float32,
        activation: Optional[str] = None,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"num_features: expected an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features: expected a positive int, got {num_features}")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}") from None
        if dtype not in _MODULE_DTYPES:
            raise TypeError(
                "dtype: expected float32 or float64 (float32 modules also take float16 and "
                "bfloat16 input), "
                f"got {dtype}"
            )
        self.num_features = int(num_features)
        self.eps = F._check_eps(eps)
        self.momentum = None if momentum is None else F._check_momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self.dtype = dtype
        A.check_activation(activation)
        self.activation = activation
        c = self.num_features
        self.weight: Optional[np.ndarray] = np.ones(c, dtype) if self.affine else None
        self.bias: Optional[np.ndarray] = np.zeros(c, dtype) if self.affine and bias else None
        self.running_mean: Optional[np.ndarray] = None
        self.running_var: Optional[np.ndarray] = None
        self.num_batches_tracked: Optional[int] = None
        if self.track_running_stats:
            self.running_mean = np.zeros(c, dtype)
            self.running_var = np.ones(c, dtype)
            self.num_batches_tracked = 0
        self.training = True
        self.grad_weight: Optional[np.ndarray] = None
        self.grad_bias: Optional[np.ndarray] = None
        self.grad_residual: Optional[np.ndarray] = None
        # (x, save_mean, save_invstd, used batch statistics, y if ReLU, had a residual) of the
        # last forward
        self._saved: Optional[tuple] = None

    # -- mode ------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "_BatchNorm":
        """Sets training mode (batch statistics, running-statistics update); returns self.

        ``mode`` is a bool (or ``numpy.bool_``): anything else raises ``TypeError``, since
        ``bool("False")`` is true.
        """
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(
                f"train: training mode is expected to be boolean, got {type(mode).__name__}"
            )
        self.training = bool(mode)
        return self

    def eval(self) -> "_BatchNorm":
        """Sets inference mode (running statistics); returns self."""
        return self.train(False)

    # -- forward / backward ----------------------------------------------------------------------

    def _check_input(self, x: object) -> np.ndarray:
        x = F.check_input(x)
        if x.ndim not in self._ndims:
            raise ValueError(f"expected {self._ndims_text} input (got {x.ndim}D input)")
        halves = self.dtype == np.float32 and (x.dtype == np.float16 or A.is_bfloat16(x.dtype))
        if x.dtype != self.dtype and not halves:
            accepted = ("float32, float16 or bfloat16" if self.dtype == np.float32
                        else str(self.dtype))
            raise TypeError(f"x: expected dtype {accepted} (the module's dtype), got {x.dtype}")
        axis = F.normalize_axis(self.axis, x.ndim)
        if x.shape[axis] != self.num_features:
            raise ValueError(
                f"x: expected {self.num_features} channels on axis {self.axis}, got "
                f"{x.shape[axis]} (input shape {x.shape})"
            )
        return x

    def __call__(self, x: np.ndarray, residual: Optional[np.ndarray] = None) -> np.ndarray:
        # (a subclass's forward(x) without a residual still works when none is given)
        return self.forward(x) if residual is None else self.forward(x, residual)

    def forward(self, x: np.ndarray, residual: Optional[np.ndarray] = None) -> np.ndarray:
        """Normalizes ``x`` of shape (N, C, ...) (or channels-last with ``axis=-1``).

        Training mode normalizes with the batch statistics and, when tracking, updates the running
        statistics and ``num_batches_tracked``; eval mode uses the running statistics (or the batch
        statistics when ``track_running_stats=False``). ``residual`` (x's shape and dtype) is
        added after the normalization and the module's activation (``activation="relu"``) applied,
        in the same pass. Returns y, same shape and dtype as x.
        """
        x = self._check_input(x)
        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        momentum = self._step_momentum() if update else self.momentum
        y, save_mean, save_invstd, skipped = F.forward_counting_skips(
            x,
            self.weight,
            self.bias,
            self.running_mean if (update or not use_batch_stats) else None,
            self.running_var if (update or not use_batch_stats) else None,
            training=use_batch_stats,
            momentum=0.0 if momentum is None else momentum,
            eps=self.eps,
            axis=self.axis,
            residual=residual,
            activation=self.activation,
        )
        if update:
            self.num_batches_tracked += 1
        self._saved = (x, save_mean, save_invstd, use_batch_stats,
                       y if self.activation else None, residual is not None)
        if skipped:  # after the state is complete: the warning may be raised as an error
            F.warn_skipped(skipped, self.num_features, stacklevel=_caller_stacklevel())
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient of the last forward: returns dx and sets ``grad_weight`` and ``grad_bias``,
        and ``grad_residual`` when the forward had a residual (dy through the activation)."""
        if self._saved is None:
            raise ValueError("backward: expected a forward call before backward, got none")
        x, save_mean, save_invstd, use_batch_stats, y, had_residual = self._saved
        self._check_dy(dy, x)
        dx, grad_weight, grad_bias, *rest = F.batch_norm_backward(
            dy, x, save_mean, save_invstd, self.weight, training=use_batch_stats, axis=self.axis,
            activation=self.activation, y=y, return_residual_grad=had_residual,
        )
        self.grad_residual = rest[0] if had_residual else None
        self.grad_weight = grad_weight if self.weight is not None else None
        self.grad_bias = grad_bias if self.bias is not None else None
        return dx

    def fold_into(self, weight: np.ndarray, bias: Optional[np.ndarray] = None, *,
                  layer: str = "conv", groups: int = 1) -> Tuple[np.ndarray, np.ndarray]:
        """(weight, bias) of the layer before this BatchNorm with the BatchNorm's inference form
        folded in (bnc.fold_batch_norm with this module's statistics, weight, bias and eps)."""
        if self.running_mean is None:
            raise ValueError("fold_into: expected running statistics (track_running_stats=True), "
                             "got a module without them")
        return fold_batch_norm(weight, bias, self.running_mean, self.running_var, self.weight,
                               self.bias, self.eps, layer=layer, groups=groups)

    def _step_momentum(self) -> Optional[float]:
        """The momentum of a training step that updates the running statistics (the cumulative
        average's 1 / (steps + 1) for momentum=None), after checking the step count."""
        if not 0 <= self.num_batches_tracked < _INT64_MAX:
            # the step adds 1, and state_dict must still save it as an int64
            raise ValueError(
                "num_batches_tracked: expected a non-negative count below "
                f"{_INT64_MAX} before a training step, got {self.num_batches_tracked}"
            )
        if self.momentum is None:  # cumulative moving average
            return 1.0 / (self.num_batches_tracked + 1)
        return self.momentum

    @staticmethod
    def _check_dy(dy: object, x: np.ndarray) -> None:
        """dy of a backward: an ndarray of the last input's shape and dtype."""
        if not isinstance(dy, np.ndarray):
            raise TypeError(f"dy: expected a numpy.ndarray, got {type(dy).__name__}")
        if dy.shape != x.shape:
            raise ValueError(f"dy: expected the shape of the last input {x.shape}, got {dy.shape}")
        if dy.dtype != x.dtype:
            raise TypeError(f"dy: expected dtype {x.dtype} (the last input's), got {dy.dtype}")

    # -- state -----------------------------------------------------------------------------------

    def _state_names(self) -> Tuple[str, ...]:
        names = []
        if self.weight is not None:
            names.append("weight")
        if self.bias is not None:
            names.append("bias")
        if self.track_running_stats:
            names += ["running_mean", "running_var", "num_batches_tracked"]
        return tuple(names)

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of the state, with PyTorch's key names and shapes.

        num_batches_tracked is a 0-d int64 array.
        """
        state = {}
        for name in self._state_names():
            if name == "num_batches_tracked":
                state[name] = np.array(self.num_batches_tracked, dtype=np.int64)
            else:
                state[name] = getattr(self, name).copy()
        return state

    def load_state_dict(
        self, state_dict: Dict[str, object], strict: bool = True
    ) -> Tuple[List[str], List[str]]:
        """Loads a state dict such as ``{k: v.numpy() for k, v in torch_bn.state_dict().items()}``.

        Everything is checked before anything is written: with ``strict`` (the default) missing
        or unexpected keys raise ``ValueError``; without it, the keys present are loaded and the
        others ignored, as in PyTorch. Wrong shapes (``ValueError``) and dtypes (``TypeError``:
        nothing is cast) raise and leave the module unchanged. Returns ``(missing_keys,
        unexpected_keys)``.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
        names = self._state_names()
        missing = [k for k in names if k not in state_dict]
        unexpected = [k for k in state_dict if k not in names]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if strict and unexpected:
                parts.append(f"unexpected keys {unexpected}")
            raise ValueError(f"state_dict: expected keys {list(names)}, got {'; '.join(parts)}")
        values = {}
        for name in names:
            if name in missing:
                continue
            value = np.asarray(state_dict[name])
            if name == "num_batches_tracked":
                if value.dtype.kind not in "iu":
                    raise TypeError(
                        f"num_batches_tracked: expected an integer dtype, got {value.dtype}"
                    )
                if value.shape not in ((), (1,)):
                    raise ValueError(
                        "num_batches_tracked: expected a 0-d integer array, got shape "
                        f"{value.shape}"
                    )
                count = int(value.reshape(()))
                if not 0 <= count <= _INT64_MAX:  # state_dict saves it as an int64
                    raise ValueError(
                        "num_batches_tracked: expected a non-negative count an int64 can hold "
                        f"(0 to {_INT64_MAX}), got {count}"
                    )
                values[name] = count
                continue
            if value.shape != (self.num_features,):
                raise ValueError(
                    f"{name}: expected shape ({self.num_features},), got {value.shape}"
                )
            if value.dtype != self.dtype:
                raise TypeError(f"{name}: expected dtype {self.dtype}, got {value.dtype}")
            # a copy: the dict may hold the module's own arrays, which the loop below overwrites
            values[name] = value.copy()
        for name, value in values.items():
            if name == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                np.copyto(getattr(self, name), value)
        return missing, unexpected

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"axis={self.axis}, dtype={self.dtype}"
            + (f", activation={self.activation!r})" if self.activation else ")")
        )


class BatchNorm1d(_BatchNorm):
    """BatchNorm over (N, C) or (N, C, L) input (or (N, L, C) with ``axis=-1``)."""

    _ndims = (2, 3)
    _ndims_text = "2D or 3D"


class BatchNorm2d(_BatchNorm):
    """BatchNorm over (N, C, H, W) input (or (N, H, W, C) with ``axis=-1``)."""

    _ndims = (4,)
    _ndims_text = "4D"


class BatchNorm3d(_BatchNorm):
    """BatchNorm over (N, C, D, H, W) input (or (N, D, H, W, C) with ``axis=-1``)."""

    _ndims = (5,)
    _ndims_text = "5D"
