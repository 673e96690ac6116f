"""The output pool: memory of large outputs that the caller has dropped, kept for the next output of
the same size.

A fresh 100 MB array costs ~25 ms of page faults the first time it is written, several times the
batch norm that writes it; a training loop allocates the same sizes every step. So outputs of at
least MIN_BYTES bytes (y, dx, and bnc.torch's tensors) take their memory from here: a block of
exactly that size that an earlier output gave back, or a new one. An output gives its block back
when the last array, view or tensor that uses its memory is gone (the destructor of the capsule
every view keeps alive), never earlier. The pool keeps at most `limit` bytes of such
blocks, the most recently returned first; older ones go back to the system. Thread-safe.

bnc.set_output_pool_bytes(n) sets the limit (0 switches the pool off: every output is a fresh
np.empty); the environment variable BNC_OUTPUT_POOL_BYTES sets it at import. Default: 1 GiB.
"""

from __future__ import annotations

import os

from . import _core

# Smaller outputs: plain np.empty. Between 256 KiB and a few MiB glibc's malloc usually reuses freed
# blocks without page faults, but not always: in a stack of layers whose outputs are kept, then
# freed in reverse, it trims its heap and every output faults in again (docs/benchmarks.md,
# "Output allocation in a loop": 4x a step of 1 MiB layers).
MIN_BYTES = 256 << 10
DEFAULT_LIMIT = 1 << 30


class OutputPool:
    """The pool's Python face; its blocks are kept by bnc._core (csrc/bindings/pool.cpp: there
    an allocate/drop cycle costs about what np.empty does). A block is 64-byte aligned and goes
    back to the pool in the destructor of the capsule that every view of its array, and every
    torch tensor made from one, keeps alive. Thread-safe: the GIL serializes the pool's
    functions."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        _core.pool_configure(limit, MIN_BYTES)

    # An uninitialized C-contiguous array, like np.empty(shape, dtype) (no Python frame: it is on
    # every call of a small layer).
    empty = staticmethod(_core.pool_empty)

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        self._limit = limit
        _core.pool_configure(limit, MIN_BYTES)

    def held_bytes(self) -> int:
        """Bytes of returned blocks the pool holds now."""
        return _core.pool_held_bytes()


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
