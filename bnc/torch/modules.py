"""bnc.torch.BatchNorm1d/2d/3d: subclasses of torch's, the same in everything (constructor,
parameters, buffers, state_dict, repr) but the forward, which runs bnc's kernels on CPU tensors;
and convert_batchnorm, which swaps torch's for them in a model."""

from __future__ import annotations

import torch

from . import functional


class _BncBatchNorm:
    """The forward of torch's _BatchNorm, step for step, with bnc's batch norm; and the fused
    epilogue: `activation="relu"` (a keyword beyond torch's constructor) and forward(input,
    residual) give relu(BN(input) + residual) in one pass."""

    activation = None  # (a class attribute: modules converted from torch's have none)

    def __init__(self, *args, activation=None, **kwargs):
        if activation not in (None, "relu"):
            raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
        super().__init__(*args, **kwargs)
        self.activation = activation

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (f", activation={self.activation!r}" if self.activation else "")

    def forward(self, input: torch.Tensor, residual=None) -> torch.Tensor:
        self._check_input_dim(input)
        # Parameters and buffers straight from their dicts: nn.Module's attribute lookup is a
        # Python call, ~0.4 us each (a missing entry takes it, for torch's AttributeError).
        try:
            parameters, buffers = self._parameters, self._buffers
            weight, bias = parameters["weight"], parameters["bias"]
            running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        except KeyError:
            weight, bias = self.weight, self.bias
            running_mean, running_var = self.running_mean, self.running_var
        training, momentum = self.training, self.momentum
        cumulative = None
        if training and self.track_running_stats:
            num_batches_tracked = buffers.get("num_batches_tracked")
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                if momentum is None:  # cumulative moving average: 1 / num_batches_tracked
                    cumulative = num_batches_tracked
        bn_training = training or (running_mean is None and running_var is None)
        tracking = not training or self.track_running_stats
        return functional.run(
            input,
            running_mean if tracking else None,
            running_var if tracking else None,
            weight,
            bias,
            bn_training,
            0.0 if momentum is None else momentum,
            self.eps,
            cumulative,
            residual,
            self.activation,
        )


class BatchNorm1d(_BncBatchNorm, torch.nn.BatchNorm1d):
    __doc__ = "torch.nn.BatchNorm1d computed by bnc on CPU (2-D or 3-D input)."


class BatchNorm2d(_BncBatchNorm, torch.nn.BatchNorm2d):
    __doc__ = "torch.nn.BatchNorm2d computed by bnc on CPU (4-D input, either memory format)."


class BatchNorm3d(_BncBatchNorm, torch.nn.BatchNorm3d):
    __doc__ = "torch.nn.BatchNorm3d computed by bnc on CPU (5-D input, either memory format)."


_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _converted(module: torch.nn.Module) -> torch.nn.Module:
    """A bnc module with module's state: the same parameter and buffer tensors, hooks, mode."""
    new = _REPLACEMENTS[type(module)].__new__(_REPLACEMENTS[type(module)])
    new.__dict__.update(module.__dict__)
    # Containers of its own (the tensors in them are shared).
    for name, value in module.__dict__.items():
        if isinstance(value, (dict, set)):
            new.__dict__[name] = type(value)(value)
    return new


def convert_batchnorm(module: torch.nn.Module, fuse_relu: bool = False) -> torch.nn.Module:
    """Replaces every torch.nn.BatchNorm1d/2d/3d in `module` (itself included, recursively) by
    bnc's, sharing the same parameter and buffer tensors, so that an optimizer that holds them
    keeps working. Submodules are replaced in their parents; returns the module (a new one when
    `module` itself is a batch norm). Subclasses of torch's batch norms are left alone.

    fuse_relu: inside an nn.Sequential, a batch norm directly followed by an nn.ReLU becomes
    bnc's with activation="relu", and the ReLU an nn.Identity (the indices stay)."""
    if type(module) in _REPLACEMENTS:
        return _converted(module)
    children = list(module.named_children())
    for index, (name, child) in enumerate(children):
        new = convert_batchnorm(child, fuse_relu)
        if new is not child:
            setattr(module, name, new)
            if (fuse_relu and isinstance(module, torch.nn.Sequential)
                    and index + 1 < len(children)
                    and type(children[index + 1][1]) is torch.nn.ReLU):
                new.activation = "relu"
                setattr(module, children[index + 1][0], torch.nn.Identity())
    return module
