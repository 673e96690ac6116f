"""bnc.torch.batch_norm: torch.nn.functional.batch_norm's signature and semantics, computed by
bnc's kernels on CPU tensors. Eager calls go through an autograd.Function (the least per-call
cost); while torch.compile traces, through the custom ops of _ops.py; what bnc does not compute
(other devices, dtypes, shapes) goes to torch's own batch norm."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _bridge, _ops


class _BatchNormFunction(torch.autograd.Function):
    """Eager forward and backward. Running statistics are updated in the forward (as torch's
    batch norm does); the backward is once differentiable. The arguments autograd need not see
    (running statistics, scalars) travel in one tuple, `call`, and what backward needs besides
    the saved tensors in one ctx attribute: apply's cost grows with the number of arguments,
    and each ctx attribute is a Python setattr."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, call):
        running_mean, running_var, training, momentum, eps, relu = call
        y, mean, invstd, views = _bridge.forward(input, weight, bias, running_mean, running_var,
                                                 training, momentum, eps, residual, relu)
        ctx.save_for_backward(input, weight, y if relu else None)
        # The statistics are NumPy arrays of ours (nothing the caller can modify); the views
        # are input's and weight's, which saved_tensors still checks for in-place changes.
        ctx.state = (mean, invstd, views, training, None if bias is None else bias.dtype,
                     None if residual is None else residual.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        # Grad mode is on in a backward only under create_graph=True: there once_differentiable
        # makes a second derivative raise. Otherwise its wrapper would only cost time.
        if torch.is_grad_enabled():
            return _backward_once(ctx, grad_y)
        return _backward(ctx, grad_y)


def _backward(ctx, grad_y):
    input, weight, y = ctx.saved_tensors
    mean, invstd, views, training, bias_dtype, residual_dtype = ctx.state
    need_input, need_weight, need_bias, need_residual, _ = ctx.needs_input_grad
    dx, grad_weight, grad_bias, grad_residual = _bridge.backward(
        grad_y, input, weight, mean, invstd, training, need_input, y, need_residual, views)
    return (dx if need_input else None,
            _as_dtype(grad_weight, weight.dtype) if need_weight else None,
            _as_dtype(grad_bias, bias_dtype) if need_bias else None,
            _as_dtype(grad_residual, residual_dtype) if need_residual else None,
            None)


_backward_once = once_differentiable(_backward)


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def run(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    training: bool,
    momentum: float,
    eps: float,
    num_batches_tracked: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """batch_norm for the modules too: with num_batches_tracked given, the running statistics'
    momentum is the cumulative average's, 1 / num_batches_tracked (momentum=None)."""
    if activation not in (None, "relu"):
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    relu = activation == "relu"
    if not _bridge.supported(input, running_mean, running_var, weight, bias) or (
            not training and (running_mean is None or running_var is None)) or (
            (running_mean is None) != (running_var is None)) or (
            residual is not None and (residual.shape != input.shape or not residual.is_cpu)) or (
            input.numel() == 0):
        # torch's own: other devices and dtypes, its errors for what it refuses, and empty
        # tensors (nothing to compute; their strides and gradients as torch makes them)
        if num_batches_tracked is not None:
            momentum = 1.0 / float(num_batches_tracked)
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y
    if training:
        _bridge.check_batch(input)
    if torch.compiler.is_compiling():
        y, mean, _, var = torch.ops.bnc.batch_norm(
            input, weight, bias, None if training else running_mean,
            None if training else running_var, training, eps, residual, relu)
        if training and running_mean is not None:
            torch.ops.bnc.update_running_stats_(running_mean, running_var, mean, var, momentum,
                                                num_batches_tracked)
        return y
    if num_batches_tracked is not None:
        momentum = 1.0 / float(num_batches_tracked)
    if not torch.is_grad_enabled() or not (
            input.requires_grad or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
            or (residual is not None and residual.requires_grad)):
        return _bridge.forward(input, weight, bias, running_mean, running_var, training,
                               momentum, eps, residual, relu)[0]
    return _BatchNormFunction.apply(input, weight, bias, residual,
                                    (running_mean, running_var, training, momentum, eps, relu))


def batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """torch.nn.functional.batch_norm, computed by bnc on CPU tensors (float32, float64, float16
    with float32 or float16 parameters; 2-D to 5-D; contiguous or channels-last, other strides
    copied once). Differentiable in input, weight and bias (once: a second derivative raises);
    traceable by torch.compile with no graph break. Other devices and dtypes run torch's own.

    Beyond F.batch_norm: ``residual`` (input's shape) is added and ``activation="relu"`` applied
    in the same pass, y = relu(BN(input) + residual), differentiable in residual too.

    Beyond torch: a channel whose batch statistics are not finite leaves its running statistics
    unchanged (with a RuntimeWarning), as in bnc.batch_norm_forward."""
    return run(input, running_mean, running_var, weight, bias, training, momentum, eps,
               residual=residual, activation=activation)


__all__ = ["batch_norm"]
_ = _ops  # the custom ops are registered on import
