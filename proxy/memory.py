"""The process's memory: out of the garbage collector's way, and given back after a wave.

Startup (modules, configuration, certificates) builds some 60,000 objects that live as long
as the process. `freeze_startup_objects` moves them out of the collector's generations, so a
full collection no longer walks them every time (measured: 23 ms of each such pause, and
full passes came every second under load). The young generation is collected every 10,000
net allocations instead of 700: the hot path makes no reference cycles, so the frequent
passes only walked requests in flight (GC time per request about halved, pauses no longer).

glibc's malloc keeps what many small frees left in its heaps for reuse, so after 1,000 slow
clients come and go the process keeps their RSS (measured: 54 -> 76 MiB, and it stayed).
`release_free_memory` returns the free pages; it is glibc's, so elsewhere (musl) this does
nothing.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable

YOUNG_COLLECTION_THRESHOLD = 10_000


def freeze_startup_objects() -> None:
    """Once the process is ready to serve: what exists now is never collected again."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Return free heap pages to the system; False where the C library cannot."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
