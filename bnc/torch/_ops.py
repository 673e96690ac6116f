"""bnc's batch norm as torch.library custom ops, for torch.compile: functional forward and backward
ops with fake kernels and a registered autograd formula, and the running-statistics update as a
separate mutating op (an op that mutates cannot carry an autograd formula).

    bnc::batch_norm(input, weight, bias, running_mean, running_var, training, eps, residual,
                    relu)
        -> (y, save_mean, save_invstd, batch_var)   # batch_var: unbiased, training only;
                                                    # y = relu?(BN(input) + residual?)
    bnc::batch_norm_backward(grad_out, input, weight, save_mean, save_invstd, training, input_grad,
                             y, residual_grad)
        -> (grad_input, grad_weight, grad_bias, grad_residual)  # empty unless asked; y: relu's
    bnc::update_running_stats_(running_mean!, running_var!, batch_mean, batch_var, momentum,
                               num_batches_tracked)  # momentum from num_batches_tracked if given

The gradient of bnc::batch_norm is bnc::batch_norm_backward, which has none itself: a second
derivative raises torch's error for an op without autograd. Eager code does not come here (the
autograd.Function in functional.py costs less per call); these ops run while compiling.
"""

# No `from __future__ import annotations`: torch.library reads the schema from the annotations.
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _bridge


def _stats_like(input: Tensor, count: int) -> Tensor:
    return input.new_empty(count, dtype=_bridge.param_dtype(input.dtype))


@torch.library.custom_op("bnc::batch_norm", mutates_args=(), device_types="cpu")
def batch_norm(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    eps: float,
    residual: Optional[Tensor],
    relu: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if not training:
        y, mean, invstd, _ = _bridge.forward(input, weight, bias, running_mean, running_var, False,
                                             0.0, eps, residual, relu)
        return y, torch.from_numpy(mean), torch.from_numpy(invstd), _stats_like(input, 0)
    # Momentum 1 into zeroed statistics: the kernel's own running-statistics step leaves there
    # the batch mean and unbiased variance, at no extra pass. A channel whose statistics are not
    # finite is left alone by the kernel; its variance is made NaN so that the update skips it.
    channels = input.shape[1]
    mean_out = torch.zeros(channels, dtype=_bridge.param_dtype(input.dtype))
    var_out = torch.zeros_like(mean_out)
    y, mean, invstd, _ = _bridge.forward(input, weight, bias, mean_out, var_out, True, 1.0, eps,
                                         residual, relu)
    mean, invstd = torch.from_numpy(mean), torch.from_numpy(invstd)
    skipped = ~(torch.isfinite(mean) & torch.isfinite(invstd) & (invstd > 0))
    if bool(skipped.any()):
        var_out[skipped] = float("nan")
    return y, mean, invstd, var_out


@batch_norm.register_fake
def _(input, weight, bias, running_mean, running_var, training, eps, residual, relu):
    last = _bridge.channels_last(input)
    y = torch.empty_like(input, memory_format=_bridge.memory_format(last, input.dim()))
    channels = input.shape[1]
    return (y, _stats_like(input, channels), _stats_like(input, channels),
            _stats_like(input, channels if training else 0))


@torch.library.custom_op("bnc::batch_norm_backward", mutates_args=(), device_types="cpu")
def batch_norm_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    save_mean: Tensor,
    save_invstd: Tensor,
    training: bool,
    input_grad: bool,
    y: Optional[Tensor],
    residual_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, grad_weight, grad_bias, grad_residual = _bridge.backward(
        grad_out, input, weight, save_mean.detach().numpy(), save_invstd.detach().numpy(),
        training, input_grad, y, residual_grad)
    if dx is None:
        dx = input.new_empty(0)
    if grad_residual is None:
        grad_residual = input.new_empty(0)
    elif grad_residual is grad_out:  # an output may not alias an input
        grad_residual = grad_out.clone()
    return dx, grad_weight, grad_bias, grad_residual


@batch_norm_backward.register_fake
def _(grad_out, input, weight, save_mean, save_invstd, training, input_grad, y, residual_grad):
    last = _bridge.channels_last(input)

    def like_input(asked):
        if not asked:
            return input.new_empty(0)
        return torch.empty_like(input, memory_format=_bridge.memory_format(last, input.dim()))
    channels = input.shape[1]
    return (like_input(input_grad), _stats_like(input, channels), _stats_like(input, channels),
            like_input(residual_grad))


def _setup_context(ctx, inputs, output):
    input, weight, bias, _, _, training, _, residual, relu = inputs
    y, mean, invstd, _ = output
    ctx.save_for_backward(input, weight, mean, invstd, y if relu else None)
    ctx.training = training
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, grad_y, _grad_mean, _grad_invstd, _grad_var):
    input, weight, mean, invstd, y = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_residual = ctx.needs_input_grad[7]
    if grad_y is None or not (need_input or need_weight or need_bias or need_residual):
        return None, None, None, None, None, None, None, None, None
    dx, grad_weight, grad_bias, grad_residual = torch.ops.bnc.batch_norm_backward(
        grad_y, input, weight, mean, invstd, ctx.training, need_input, y, need_residual)
    return (dx if need_input else None,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias else None,
            None, None, None, None,
            grad_residual.to(ctx.residual_dtype) if need_residual else None, None)


batch_norm.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("bnc::update_running_stats_", mutates_args=("running_mean", "running_var"),
                         device_types="cpu")
def update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    momentum: float,
    num_batches_tracked: Optional[Tensor],
) -> None:
    # The kernel's update, from the batch statistics rounded to their dtype: in double, a
    # channel with non-finite statistics left alone.
    if num_batches_tracked is not None:  # momentum=None: the cumulative average
        momentum = 1.0 / float(num_batches_tracked)
    finite = torch.isfinite(batch_mean) & torch.isfinite(batch_var)
    for running, batch in ((running_mean, batch_mean), (running_var, batch_var)):
        old = running.double()
        new = (1.0 - momentum) * old + momentum * batch.double()
        running.copy_(torch.where(finite, new, old))


@update_running_stats_.register_fake
def _(running_mean, running_var, batch_mean, batch_var, momentum, num_batches_tracked):
    return None
