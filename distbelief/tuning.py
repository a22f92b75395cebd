"""Process-level tuning for moving model-sized messages.

libzmq allocates every received message with malloc. glibc serves allocations above
its mmap threshold (at most 32 MiB by default) with fresh mmap'd pages and returns
them on free, so every model-sized message pays page faults for its whole size: for
a one-shard GoogLeNet (53 MB) that costs more than the copy itself. Raising the mmap
and trim thresholds lets glibc reuse freed heap memory instead. The price is that a
process keeps, as resident memory, the most message memory it ever had in use at once;
servers give it back with :func:`release_freed_memory` once they have been idle a while.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # keep up to 1 GiB of freed heap for reuse


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed large blocks; returns False where that is not possible."""
    libc = _libc()
    if libc is None:
        return False
    try:
        ok = libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) == 1 and ok
    except AttributeError:  # not glibc
        return False
    log.debug("malloc keeps freed memory for reuse: %s", ok)
    return ok


def release_freed_memory() -> bool:
    """Return freed heap memory to the OS now (glibc's malloc_trim); False where absent."""
    libc = _libc()
    try:
        return bool(libc and libc.malloc_trim(0))
    except AttributeError:  # not glibc
        return False


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
