"""bnc.torch: bnc's batch norm for PyTorch models on CPU.

    import bnc.torch
    model = bnc.torch.convert_batchnorm(model)   # or use bnc.torch.BatchNorm2d directly

BatchNorm1d/2d/3d subclass torch's (isinstance holds; same constructor, parameters, buffers,
state_dict and repr); their forward runs bnc's kernels on CPU tensors of float32, float64 and
float16, and torch's own implementation on other devices and dtypes. `batch_norm` is
torch.nn.functional.batch_norm. Needs torch (the `torch` extra); `import bnc` does not import it.
"""

from .functional import batch_norm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_batchnorm
from .sync import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "batch_norm",
           "convert_batchnorm"]
