"""Giving freed memory back to the OS when the engine goes idle.

After a burst of requests, CPython and torch have freed their objects, but glibc's malloc keeps the
freed pages in its arenas (one per thread that allocated, up to 8 per core), so the server's RSS stays
near its peak for good. `malloc_trim(0)` returns them. Elsewhere than glibc it does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable


class HeapTrimmer:
    """Calls malloc_trim(0) at most once per `min_interval` seconds."""

    def __init__(self, min_interval: float = 1.0, trim: Callable[[int], int] | None = None) -> None:
        self.min_interval = min_interval
        self._last = float("-inf")
        self._trim = trim or _malloc_trim()

    def __call__(self) -> None:
        now = time.monotonic()
        if self._trim is None or now - self._last < self.min_interval:
            return
        self._last = now
        self._trim(0)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
