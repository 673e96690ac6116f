"""The output pool: memory of large outputs that the caller has dropped, kept for the next output of
the same size.

A fresh 100 MB array costs ~25 ms of page faults the first time it is written, several times the
batch norm that writes it; a training loop allocates the same sizes every step. So outputs of at
least MIN_BYTES bytes (y, dx, and bnc.torch's tensors) take their memory from here: a block of
exactly that size that an earlier output gave back, or a new one. An output gives its block back
when the last array, view or tensor that uses its memory is gone (the `__del__` of the buffer
object every view keeps alive), never earlier. The pool keeps at most `limit` bytes of such
blocks, the most recently returned first; older ones go back to the system. Thread-safe.

bnc.set_output_pool_bytes(n) sets the limit (0 switches the pool off: every output is a fresh
np.empty); the environment variable BNC_OUTPUT_POOL_BYTES sets it at import. Default: 1 GiB.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections import OrderedDict
from typing import List, Optional, Tuple

import numpy as np

# Smaller outputs: plain np.empty. Between 256 KiB and a few MiB glibc's malloc usually reuses freed
# blocks without page faults, but not always: in a stack of layers whose outputs are kept, then
# freed in reverse, it trims its heap and every output faults in again (docs/benchmarks.md,
# "Output allocation in a loop": 4x a step of 1 MiB layers). A pooled output costs ~2 us more
# than np.empty (an allocate/drop cycle 2.2 us against 0.24).
MIN_BYTES = 256 << 10
DEFAULT_LIMIT = 1 << 30
_ALIGN = 64


@functools.lru_cache(maxsize=256)
def _lease_type(nbytes: int) -> type:
    """The buffer type of one output of `nbytes` bytes: a ctypes array over a pool block, which
    every NumPy view and torch tensor of the output keeps alive; when the last one is gone,
    `__del__` gives the block back (cheaper than weakref.finalize: the pool's allocate/drop cycle
    2.2 us, was 3.8)."""

    class Lease(ctypes.c_char * nbytes):
        def __del__(self) -> None:
            try:
                self._pool._give_back(nbytes, self._block)
            except Exception:  # interpreter shutdown: module globals may be gone
                pass

    return Lease


class OutputPool:
    def __init__(self, limit: int) -> None:
        # Re-entrant: a lease's __del__ may run inside empty() (a reference cycle collected there).
        self._lock = threading.RLock()
        self._limit = limit
        self._held = 0
        # returned blocks, oldest first: key -> (nbytes, block); a block is (array, aligned offset)
        self._free: "OrderedDict[int, Tuple[int, Tuple[np.ndarray, int]]]" = OrderedDict()
        self._by_size: dict = {}  # nbytes -> [keys]
        self._next_key = 0

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        with self._lock:
            self._limit = limit
            self._evict(0)

    def held_bytes(self) -> int:
        """Bytes of returned blocks the pool holds now."""
        return self._held

    def empty(self, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialized C-contiguous array, like np.empty."""
        dtype = np.dtype(dtype)
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        if nbytes < MIN_BYTES or self._limit == 0:
            return np.empty(shape, dtype)
        block = self._take(nbytes)
        if block is None:
            array = np.empty(nbytes + _ALIGN, np.uint8)
            block = (array, -array.ctypes.data % _ALIGN)  # on a cache line
        lease = _lease_type(nbytes).from_buffer(block[0], block[1])
        lease._pool = self
        lease._block = block
        return np.ndarray(shape, dtype, lease)

    def _take(self, nbytes: int) -> Optional[Tuple[np.ndarray, int]]:
        with self._lock:
            keys: List[int] = self._by_size.get(nbytes)
            if not keys:
                return None
            key = keys.pop()  # the most recently returned: still in cache, perhaps
            _, block = self._free.pop(key)
            self._held -= nbytes
            return block

    def _give_back(self, nbytes: int, block: Tuple[np.ndarray, int]) -> None:
        with self._lock:
            if nbytes > self._limit:
                return
            self._evict(nbytes)
            key = self._next_key
            self._next_key += 1
            self._free[key] = (nbytes, block)
            self._by_size.setdefault(nbytes, []).append(key)
            self._held += nbytes

    def _evict(self, room: int) -> None:
        """Drops the oldest blocks until `room` more bytes fit under the limit."""
        while self._free and self._held + room > self._limit:
            key, (nbytes, _) = self._free.popitem(last=False)
            self._by_size[nbytes].remove(key)
            self._held -= nbytes


def _initial_limit() -> int:
    text = os.environ.get("BNC_OUTPUT_POOL_BYTES", "").strip()
    if not text:
        return DEFAULT_LIMIT
    try:
        value = int(text)
    except ValueError:
        raise ImportError(f"BNC_OUTPUT_POOL_BYTES: expected a byte count, got {text!r}") from None
    if value < 0:
        raise ImportError(f"BNC_OUTPUT_POOL_BYTES: expected a byte count >= 0, got {value}")
    return value


POOL = OutputPool(_initial_limit())


def set_output_pool_bytes(n: int) -> None:
    """Sets how many bytes of dropped outputs bnc keeps for reuse (default 1 GiB; 0: none, every
    output is freshly allocated). Outputs of at least 256 KiB that the caller has dropped keep their
    memory for the next output of the same size, which then costs no page faults. Blocks beyond
    the limit, oldest first, go back to the system."""
    import numbers

    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n: expected a byte count >= 0, got {n}")
    POOL.set_limit(int(n))


def get_output_pool_bytes() -> int:
    """The output pool's limit in bytes (0: off)."""
    return POOL.limit
