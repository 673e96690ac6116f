"""bnc: Batch Normalization for the CPU on NumPy arrays, with PyTorch's semantics."""

from ._pool import get_output_pool_bytes, set_output_pool_bytes
from ._runtime import config, get_num_threads, select_isa_from_environment, set_num_threads
from .fold import fold_batch_norm
from .functional import (
    batch_norm_backward,
    batch_norm_backward_elemt,
    batch_norm_backward_reduce,
    batch_norm_elemt,
    batch_norm_forward,
    batch_norm_stats,
    merge_stats,
)
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm

select_isa_from_environment()
del select_isa_from_environment

__version__ = config()["version"]

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_stats",
    "merge_stats",
    "fold_batch_norm",
    "batch_norm_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
    "config",
    "get_num_threads",
    "set_num_threads",
    "get_output_pool_bytes",
    "set_output_pool_bytes",
    "__version__",
]
