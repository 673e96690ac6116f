"""SyncBatchNorm: batch statistics over the batches of several processes (data-parallel training),
and the protocol it shares with bnc.torch.SyncBatchNorm.

Forward (training): each process computes its (count, mean, m2) with ``batch_norm_stats``; one
all-gather sends them (float64) with a small header; every process merges the rows with
``merge_stats`` in rank order -- the same bits on every process, whatever the transport's own
reduction order -- and normalizes with ``batch_norm_elemt``. Backward:
``batch_norm_backward_reduce`` gives each process's (sum_dy, sum_dy_xmu); one all-gather; the
rows are summed in rank order;
``batch_norm_backward_elemt`` gives dx. The weight and bias gradients are each process's own
(data-parallel training sums or averages them across processes, as for any parameter). No
communication in eval mode.

The header (phase, channels, dtype) travels in the same all-gather as the numbers: processes that
disagree all raise the same ValueError naming the disagreement instead of waiting on each other.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from . import _args as A
from . import functional as F
from .modules import _BatchNorm, _caller_stacklevel

Allgather = Callable[[object], Sequence[object]]


def _agree(rows: Sequence[tuple], phase: str) -> None:
    """ValueError on every process unless all headers are equal (each process sees all rows,
    so each decides the same)."""
    headers = [row[0] for row in rows]
    if all(h == headers[0] for h in headers):
        return
    for index, what in enumerate(("phase", "channels", "dtype")):
        values = [h[index] for h in headers]
        if any(v != values[0] for v in values):
            listed = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"SyncBatchNorm {phase}: the processes disagree on {what} ({listed})")


def sync_forward(
    x: np.ndarray,
    weight: Optional[np.ndarray],
    bias: Optional[np.ndarray],
    running_mean: Optional[np.ndarray],
    running_var: Optional[np.ndarray],
    momentum: float,
    eps: float,
    axis: int,
    allgather: Allgather,
    out: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Training forward over all processes: (y, mean, invstd, count, skipped). mean and invstd are
    the global statistics (float64), count the global elements per channel; the running
    statistics (when given) are updated in place with the unbiased global variance, except for
    channels whose statistics are not finite (`skipped` counts them)."""
    count, mean, m2 = F.batch_norm_stats(x, axis=axis)
    channels = mean.shape[0]
    rows = allgather((("forward", channels, str(x.dtype)), count, mean, m2))
    _agree(rows, "forward")
    total, mean, m2 = F.merge_stats([r[1] for r in rows], [r[2] for r in rows],
                                    [r[3] for r in rows])
    if total <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got "
            f"{total} over {len(rows)} processes")
    var = m2 / total
    with np.errstate(invalid="ignore"):
        invstd = 1.0 / np.sqrt(var + eps)
    y = F.batch_norm_elemt(x, mean, invstd, weight, bias, axis=axis, out=out)
    finite = np.isfinite(mean) & np.isfinite(var)
    skipped = int(channels - np.count_nonzero(finite))
    for running, batch in ((running_mean, mean), (running_var, var * (total / (total - 1)))):
        if running is not None:
            updated = (1.0 - momentum) * running.astype(np.float64) + momentum * batch
            np.copyto(running, updated, where=finite, casting="same_kind")
    return y, mean, invstd, total, skipped


def sync_backward(
    dy: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    invstd: np.ndarray,
    weight: Optional[np.ndarray],
    count: int,
    axis: int,
    allgather: Allgather,
    out: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, grad_weight, grad_bias) of sync_forward: dx from the sums of all processes; the weight
    and bias gradients this process's own, in its parameters' dtype."""
    sum_dy, sum_dy_xmu = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
    rows = allgather((("backward", sum_dy.shape[0], str(x.dtype)), sum_dy, sum_dy_xmu))
    _agree(rows, "backward")
    total_dy, total_dy_xmu = rows[0][1].copy(), rows[0][2].copy()
    for row in rows[1:]:  # in rank order: the same bits on every process
        total_dy += row[1]
        total_dy_xmu += row[2]
    dx = F.batch_norm_backward_elemt(dy, x, mean, invstd, weight, total_dy, total_dy_xmu, count,
                                     axis=axis, out=out)
    pdtype = A.param_dtype(x.dtype)
    return dx, (sum_dy_xmu * invstd).astype(pdtype), sum_dy.astype(pdtype)


def local_grads(dy: np.ndarray, x: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                axis: int) -> Tuple[np.ndarray, np.ndarray]:
    """(grad_weight, grad_bias) alone: no communication (a backward that needs no dx)."""
    sum_dy, sum_dy_xmu = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
    pdtype = A.param_dtype(x.dtype)
    return (sum_dy_xmu * invstd).astype(pdtype), sum_dy.astype(pdtype)


class SyncBatchNorm(_BatchNorm):
    """bnc's BatchNorm over the batches of all processes of an mpi4py communicator.

    SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
    bias=True, axis=1, dtype=numpy.float32, comm=None): like bnc.BatchNorm1d/2d/3d (input of 2 to
    5 dimensions), with comm an mpi4py communicator (default MPI.COMM_WORLD; any
    sub-communicator). In training, forward and backward are collective: every process of comm
    calls them, in the same order (a process with an empty batch too: it gets an empty output).
    Eval mode does not communicate. mpi4py (the `mpi` extra) is imported when one is made.

    If a process dies, MPI aborts the job (the others do not wait forever).
    """

    _ndims = (2, 3, 4, 5)
    _ndims_text = "2D to 5D"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, bias: bool = True,
                 axis: int = 1, dtype: object = np.float32, comm: object = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, bias, axis,
                         dtype)
        if comm is None:
            from mpi4py import MPI  # noqa: PLC0415  (an optional dependency)

            comm = MPI.COMM_WORLD
        if not callable(getattr(comm, "allgather", None)):
            raise TypeError(f"comm: expected an mpi4py communicator, got {type(comm).__name__}")
        self.comm = comm
        self._sync_saved: Optional[tuple] = None

    def _allgather(self, obj: object) -> List[object]:
        return self.comm.allgather(obj)

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.training:  # no communication in eval mode
            self._sync_saved = None
            return super().forward(x)
        x = self._check_input(x)
        update = self.track_running_stats
        momentum = self._step_momentum() if update else self.momentum
        axis = F.normalize_axis(self.axis, x.ndim)
        y, mean, invstd, count, skipped = sync_forward(
            A.contiguous(x), self.weight, self.bias, self.running_mean if update else None,
            self.running_var if update else None, 0.0 if momentum is None else momentum,
            self.eps, axis, self._allgather)
        if update:
            self.num_batches_tracked += 1
        self._saved = None
        self._sync_saved = (x, mean, invstd, count, axis)
        if skipped and update:
            F.warn_skipped(skipped, self.num_features, stacklevel=_caller_stacklevel())
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self._sync_saved is None:
            return super().backward(dy)
        x, mean, invstd, count, axis = self._sync_saved
        self._check_dy(dy, x)
        dx, grad_weight, grad_bias = sync_backward(A.contiguous(dy), A.contiguous(x), mean, invstd,
                                                   self.weight, count, axis, self._allgather)
        self.grad_weight = grad_weight if self.weight is not None else None
        self.grad_bias = grad_bias if self.bias is not None else None
        return dx

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", comm={type(self.comm).__name__})"
