"""bnc.torch.SyncBatchNorm: batch statistics over the processes of a torch.distributed group (gloo
on CPU, or any backend), with bnc.sync's protocol: one all-gather of each process's float64
(count, mean, m2) merged in rank order, one of (sum_dy, sum_dy_xmu) in the backward.

It subclasses torch.nn.modules.batchnorm._BatchNorm, not torch.nn.SyncBatchNorm:
DistributedDataParallel refuses the latter on CPU. On CUDA tensors it runs torch's own
SyncBatchNorm computation.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from .. import sync as protocol
from . import _bridge, functional


def _gatherer(group):
    def allgather(obj: object) -> List[object]:
        out: List[object] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out
    return allgather


class _SyncFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, group):
        last = _bridge.channels_last(input)
        axis = -1 if last else 1
        pdtype = _bridge.param_dtype(input.dtype)
        y, y_array = _bridge.empty_output(input, last)
        x = _bridge.kernel_view(input, last)
        rm, rv = _bridge._vector(running_mean, pdtype), _bridge._vector(running_var, pdtype)
        gather = _gatherer(group)
        _, mean, invstd, count, skipped = protocol.sync_forward(
            x, _bridge._vector(weight, pdtype), _bridge._vector(bias, pdtype), rm, rv, momentum,
            eps, axis, gather, out=y_array)
        for buffer, array in ((running_mean, rm), (running_var, rv)):
            if _bridge._copied(buffer, pdtype):
                buffer.detach().copy_(torch.from_numpy(array))
        if skipped and running_mean is not None:
            from .. import functional as F  # noqa: PLC0415

            F.warn_skipped(skipped, mean.shape[0], stacklevel=4)
        ctx.save_for_backward(input, weight)
        ctx.stats = (mean, invstd, count, axis, gather)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        input, weight = ctx.saved_tensors
        mean, invstd, count, axis, gather = ctx.stats
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        last = axis == -1
        x = _bridge.kernel_view(input, last)
        dy = _bridge.kernel_view(grad_y if grad_y.dtype == input.dtype else grad_y.to(input.dtype),
                                 last)
        dx = None
        if need_input:  # collective: every process needs its dx in data-parallel training
            dx, dx_array = _bridge.empty_output(input, last)
            pdtype = _bridge.param_dtype(input.dtype)
            _, grad_weight, grad_bias = protocol.sync_backward(
                dy, x, mean, invstd, _bridge._vector(weight, pdtype), count, axis, gather,
                out=dx_array)
        else:  # no input gradient: the local sums only, no communication
            grad_weight, grad_bias = protocol.local_grads(dy, x, mean, invstd, axis)
        return (dx,
                torch.from_numpy(grad_weight).to(weight.dtype) if need_weight else None,
                torch.from_numpy(grad_bias).to(ctx.bias_dtype) if need_bias else None,
                None, None, None, None, None)


class SyncBatchNorm(_BatchNorm):
    """torch.nn.SyncBatchNorm's interface on CPU, computed by bnc.

    SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
    process_group=None, device=None, dtype=None). In training, forward and backward are
    collective over process_group (default: the world): every process calls them in the same
    order, a process with an empty batch too. Processes that disagree on the channel count, dtype
    or phase all raise ValueError. Eval mode, and a backward that needs no input gradient, do not
    communicate. Without an initialized process group (or with one process) it is bnc.torch's
    BatchNorm. If a process dies, the others' collective fails after the process group's timeout.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        tracking = not self.training or self.track_running_stats
        running_mean = self.running_mean if tracking else None
        running_var = self.running_var if tracking else None
        group = self.process_group or dist.group.WORLD if dist.is_available() else None
        sync = (bn_training and self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(group) > 1)
        if not sync:
            return functional.run(input, running_mean, running_var, self.weight, self.bias,
                                  bn_training, momentum, self.eps)
        if input.is_cuda:  # torch's own
            from torch.nn.modules._functions import SyncBatchNorm as TorchSync  # noqa: PLC0415

            return TorchSync.apply(input, self.weight, self.bias, running_mean, running_var,
                                   self.eps, momentum, group, dist.get_world_size(group))
        if not _bridge.supported(input, running_mean, running_var, self.weight, self.bias):
            raise ValueError(
                f"SyncBatchNorm: bnc computes CPU tensors of float32, float64, float16 and "
                f"bfloat16 with matching parameters, got {input.dtype} input on {input.device}")
        return _SyncFunction.apply(input, self.weight, self.bias, running_mean, running_var,
                                   momentum, self.eps, group)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None):
        """Replaces every batch norm of `module` (torch's BatchNorm1d/2d/3d, bnc.torch's) by a
        SyncBatchNorm sharing its parameters and buffers; returns the module (a new one when
        `module` itself is a batch norm)."""
        converted = module
        if isinstance(module, _BatchNorm) and not isinstance(module, cls) and not isinstance(
                module, torch.nn.SyncBatchNorm):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
