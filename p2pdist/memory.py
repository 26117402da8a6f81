"""Handing freed heap back to the operating system after a daemon drops much of its state.

CPython frees objects to glibc's malloc, which keeps the pages of a fragmented heap and of its
per-thread arenas; `malloc_trim(0)` returns what is free, so RSS falls back after a burst.
"""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: libc is among them, no lookup process
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)  # glibc only (not musl, not macOS)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def release_freed_memory() -> bool:
    """Collect garbage, then return free heap pages to the OS; True if malloc could be trimmed."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class ShrinkWatch:
    """When to trim: once a collection has shrunk to half its peak since the last trim, by at
    least `min_drop` items (a flood's records expire over a while, not in one sweep)."""

    def __init__(self, min_drop: int = 256) -> None:
        self.min_drop = min_drop
        self.peak = 0

    def shrunk(self, size: int) -> bool:
        self.peak = max(self.peak, size)
        if size * 2 <= self.peak and self.peak - size >= self.min_drop:
            self.peak = size
            return True
        return False
