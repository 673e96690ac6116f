"""Tensors to bnc's NumPy functions and back: which tensors bnc computes, in which layout, and the
forward and backward on CPU tensors. Knows nothing of autograd or of the custom ops; both call
these. Nothing here copies a tensor except a strided input (once) and half-precision parameters
(to the float32 that bnc's float16 and bfloat16 kernels take). bfloat16 tensors reach NumPy as
ml_dtypes' bfloat16 (torch.from_numpy and Tensor.numpy refuse bfloat16: the bits go as uint16);
without ml_dtypes they go to torch's own batch norm."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

import bnc
from bnc._pool import POOL

# Input dtypes bnc computes, and the parameter dtypes it takes with them.
_PARAM_DTYPES = {
    torch.float32: (torch.float32,),
    torch.float64: (torch.float64,),
    torch.float16: (torch.float32, torch.float16),
}
try:
    import ml_dtypes

    _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
    _PARAM_DTYPES[torch.bfloat16] = (torch.float32, torch.bfloat16)
except ImportError:  # bfloat16 tensors go to torch's own batch norm
    _BFLOAT16 = None


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (bfloat16 through its bits)."""
    if t.dtype == torch.bfloat16:
        return t.detach().view(torch.uint16).numpy().view(_BFLOAT16)
    return t.numpy(force=True)  # (detaches: cheaper than .detach().numpy())


_STRIDED = torch.strided


def supported(input: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Whether bnc computes this call: CPU tensors of 2 to 5 dimensions, float32 or float64 with
    parameters of the same dtype, or float16 or bfloat16 with parameters all float32 or all of
    the input's dtype (torch refuses a mix), each (C,).
    Anything else goes to torch's own batch norm (the callers' fallback), which also gives
    torch's own errors for what it refuses."""
    # (is_cpu, layout identity and integer sizes: comparing a torch.Size with a tuple goes
    # through symbolic-shape code, microseconds per call)
    if not input.is_cpu or not 2 <= input.dim() <= 5 or input.layout is not _STRIDED:
        return False
    allowed = _PARAM_DTYPES.get(input.dtype)
    if allowed is None:
        return False
    channels = input.shape[1]
    dtype = None  # the parameters' one dtype
    for p in params:  # (numel: a 1-D tensor's length, cheaper than shape[0])
        if p is None:
            continue
        if dtype is None:
            dtype = p.dtype
            if dtype not in allowed:
                return False
        if (p.dtype != dtype or not p.is_cpu or p.dim() != 1 or p.numel() != channels
                or p.layout is not _STRIDED):
            return False
    return True


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved statistics (and of bnc's parameters) for input of `dtype`."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


_LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def channels_last(t: torch.Tensor) -> bool:
    """Whether input t is computed channels-last: handed to the kernels as its (N, ..., C) view
    (copied there first when it is not channels-last contiguous), its outputs channels-last.
    torch's batch norm forward's choice of output format: a tensor contiguous in one of the two
    formats keeps it (plain first); any other goes by torch's reading of its strides."""
    fmt = _LAST_FORMATS.get(t.dim())
    if fmt is None or t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=fmt):
        return True
    return _strides_like_channels_last(t.shape, t.stride())


def _strides_like_channels_last(shape, strides) -> bool:
    """torch's reading of strides as channels-last (suggest_memory_format; c10's
    is_channels_last_strides_2d_s4 and _3d_s5): strides that grow from C through the spatial
    dimensions (last first) to N, with its tie-breaks for dimensions of size 1."""
    if strides[1] == 0:
        return False
    least = 0
    for d in (1, 3, 2, 0) if len(shape) == 4 else (1, 4, 3, 2, 0):
        if shape[d] == 0 or strides[d] < least or (d == 0 and least == strides[1]):
            return False
        least = strides[d] * shape[d] if shape[d] > 1 else strides[d]
    return True


def memory_format(last: bool, dim: int) -> torch.memory_format:
    return _LAST_FORMATS[dim] if last else torch.contiguous_format


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64,
                 torch.float16: np.float16, torch.bfloat16: np.uint16}


def empty_output(input: torch.Tensor, last: bool) -> Tuple[torch.Tensor, np.ndarray]:
    """An output of input's shape and dtype in the layout the kernels write (input's memory
    format when it is contiguous or channels-last, else contiguous: other strides are copied),
    and the NumPy view the kernels write. Large ones take their memory from bnc's output pool
    (bnc.set_output_pool_bytes): it goes back there when the last tensor using it is gone."""
    if input.numel() == 0:  # (NumPy gives an empty array zero strides; these are the fake op's)
        t = torch.empty_like(input, memory_format=memory_format(last, input.dim()))
        return t, kernel_view(t, last)
    shape = tuple(input.shape)
    if last:
        shape = (shape[0],) + shape[2:] + (shape[1],)
    array = POOL.empty(shape, _NUMPY_DTYPES[input.dtype])
    if input.dtype == torch.bfloat16:
        array = array.view(_BFLOAT16)
    return _as_tensor(array, last, input.dtype), array


def kernel_view(t: torch.Tensor, last: bool) -> np.ndarray:
    """The C-contiguous NumPy view the kernels read or write: (N, C, ...) or, channels-last,
    (N, ..., C). A tensor in neither layout is copied once."""
    if last:
        fmt = _LAST_FORMATS[t.dim()]
        if not t.is_contiguous(memory_format=fmt):
            t = t.detach().contiguous(memory_format=fmt)
        # The (N, ..., C) view taken in NumPy: a torch permute (and detach) goes through the
        # dispatcher, ~10x slower than NumPy's transpose when a step's caches are cold
        # (docs/benchmarks.md, "the bridge's torch calls").
        array = _numpy(t)
        return array.transpose(0, *range(2, array.ndim), 1)
    if not t.is_contiguous():
        t = t.detach().contiguous()
    return _numpy(t)


def _vector(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[np.ndarray]:
    """A parameter as bnc takes it: itself when of `dtype` and contiguous, else a copy."""
    if t is None:
        return None
    if t.dtype != dtype or not t.is_contiguous():
        t = t.detach().to(dtype).contiguous()
    return t.numpy(force=True)  # (detaches: cheaper than .detach().numpy())


def _copied(t: Optional[torch.Tensor], dtype: torch.dtype) -> bool:
    """Whether _vector(t, dtype) is a copy."""
    return t is not None and (t.dtype != dtype or not t.is_contiguous())


def check_batch(input: torch.Tensor) -> None:
    """torch's check (torch.nn.functional._verify_batch_size), with its message."""
    channels = input.shape[1]
    if channels:  # values per channel: all of them over the channels
        values = input.numel() // channels
    else:
        values = input.shape[0]
        for s in input.shape[2:]:
            values *= s
    if values == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}")


def forward(
    input: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    training: bool,
    momentum: float,
    eps: float,
    residual: Optional[torch.Tensor] = None,
    relu: bool = False,
) -> Tuple[torch.Tensor, np.ndarray, np.ndarray, tuple]:
    """(y, save_mean, save_invstd, views): y = relu?(BN(input) + residual?) (the fused epilogue:
    residual in input's layout, copied once if not), the statistics as NumPy arrays (what backward
    takes), and the views of input and weight the kernels read, for backward to take again (it
    need not look at the layout, or copy a strided input, twice). Training with running
    statistics updates them in place (as torch does); float16 running statistics go through
    float32 and are rounded back."""
    last = channels_last(input)
    pdtype = param_dtype(input.dtype)
    y, y_array = empty_output(input, last)
    rm, rv = _vector(running_mean, pdtype), _vector(running_var, pdtype)
    x, w = kernel_view(input, last), _vector(weight, pdtype)
    _, save_mean, save_invstd = bnc.batch_norm_forward(
        x, w, _vector(bias, pdtype), rm, rv,
        training=training, momentum=momentum, eps=eps, axis=-1 if last else 1, out=y_array,
        residual=None if residual is None else kernel_view(residual.to(input.dtype), last),
        activation="relu" if relu else None,
    )
    if training and rm is not None:  # copied running statistics (float16, strided) written back
        for buffer, array in ((running_mean, rm), (running_var, rv)):
            if _copied(buffer, pdtype):
                buffer.detach().copy_(torch.from_numpy(array))
    return y, save_mean, save_invstd, (last, x, w)


def backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: Optional[torch.Tensor],
    save_mean: np.ndarray,
    save_invstd: np.ndarray,
    training: bool,
    input_grad: bool,
    y: Optional[torch.Tensor] = None,
    residual_grad: bool = False,
    views: Optional[tuple] = None,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(grad_input or None, grad_weight, grad_bias, grad_residual or None); the weight and bias
    gradients in the statistics' dtype (float32 for float16 input). With y (the output of a
    forward with relu) grad_out is masked by y > 0 in the same pass, and grad_residual (asked
    with residual_grad) is the masked grad_out; without y it is grad_out itself. With input_grad
    and residual_grad False and no y only the two sums are computed. `views`: forward's, for
    these input and weight (autograd's saved-tensor check has refused them if they were modified
    in place since)."""
    pdtype = param_dtype(input.dtype)
    if views is None:
        last = channels_last(input)
        x, w = kernel_view(input, last), _vector(weight, pdtype)
    else:
        last, x, w = views
    axis = -1 if last else 1
    grad_out = grad_out if grad_out.dtype == input.dtype else grad_out.to(input.dtype)
    dy = kernel_view(grad_out, last)
    if y is not None:
        dx, dx_array = empty_output(input, last)
        _, grad_weight, grad_bias, *grad_residual = bnc.batch_norm_backward(
            dy, x, save_mean, save_invstd, w, training=training, axis=axis,
            out=dx_array, activation="relu", y=kernel_view(y, last),
            return_residual_grad=residual_grad)
        return (dx if input_grad else None, torch.from_numpy(grad_weight),
                torch.from_numpy(grad_bias),
                _as_tensor(grad_residual[0], last, input.dtype) if residual_grad else None)
    residual = grad_out if residual_grad else None
    if not input_grad:
        sum_dy, sum_dy_xmu = bnc.batch_norm_backward_reduce(dy, x, save_mean, save_invstd,
                                                            axis=axis)
        grad_weight = torch.from_numpy(sum_dy_xmu * save_invstd.astype(np.float64)).to(pdtype)
        return None, grad_weight, torch.from_numpy(sum_dy).to(pdtype), residual
    dx, dx_array = empty_output(input, last)
    _, grad_weight, grad_bias = bnc.batch_norm_backward(
        dy, x, save_mean, save_invstd, w, training=training, axis=axis, out=dx_array)
    return dx, torch.from_numpy(grad_weight), torch.from_numpy(grad_bias), residual


def _as_tensor(array: np.ndarray, last: bool, dtype: torch.dtype) -> torch.Tensor:
    """A kernel-layout NumPy array as a tensor of the logical (N, C, ...) shape."""
    if last:  # (in NumPy, as in kernel_view)
        array = array.transpose(0, array.ndim - 1, *range(1, array.ndim - 1))
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)
