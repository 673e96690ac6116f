"""Run-time configuration: ISA choice at import, thread count, and ``bnc.config()``."""

from __future__ import annotations

import numbers
import os
from typing import Any, Dict

from . import _core


def select_isa_from_environment() -> None:
    """Picks the best ISA path the CPU has, or the one named by ``BNC_FORCE_ISA``."""
    forced = os.environ.get("BNC_FORCE_ISA", "").strip().lower()
    try:
        _core.select_isa(forced)
    except ValueError as error:
        raise ImportError(
            f"{error} (this CPU has: {', '.join(_core.available_isas())})"
        ) from None


# The thread cap, defined once in the binding (more is a mistake, not a machine: libgomp aborts
# on absurd counts).
MAX_THREADS: int = _core.MAX_THREADS


def set_num_threads(n: int) -> None:
    """Sets the number of threads the kernels use (default: ``OMP_NUM_THREADS`` or all cores;
    1 in a child made by ``fork``).

    Results are bitwise identical for any thread count. Calls in flight are not affected.

    Warning:
        In a child made by ``fork`` (``os.fork()``, a ``multiprocessing`` pool with the fork start
        method), ``n > 1`` hangs the child's next multi-threaded call forever if the thread that
        forked had run a multi-threaded call (or any OpenMP parallel region of the same libgomp)
        before the fork: libgomp's thread pool does not survive fork. Leave such a child on its
        one thread, or start workers with the ``spawn`` or ``forkserver`` method.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"n: expected a thread count from 1 to {MAX_THREADS}, got {n}")
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of threads the kernels use (1 in a forked child until it sets a count)."""
    return int(_core.get_num_threads())


def config() -> Dict[str, Any]:
    """bnc's build and run-time configuration."""
    return {
        "version": _core.__version__,
        "isa": _core.active_isa(),
        "isa_available": list(_core.available_isas()),
        "openmp": bool(_core.have_openmp()),
        "num_threads": get_num_threads(),
        "sanitized": bool(_core.sanitized),
    }
