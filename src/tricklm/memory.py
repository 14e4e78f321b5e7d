"""glibc malloc settings that keep a long-running server's resident memory flat.

Two threads allocate here (the event loop and the engine), and torch allocates and frees step-sized
buffers through plain malloc. glibc's defaults let that ratchet resident memory up: each thread gets
its own arena, and freeing a large mmapped block raises the mmap threshold, so later blocks of that size
come from the arenas' heaps, where fragmentation keeps pages resident.
"""

from __future__ import annotations

import contextlib
import ctypes

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Blocks above this are mmapped and go back to the OS on free; a fixed value also stops glibc's dynamic
# threshold from growing. Below it are Python objects and small tensors, which arenas handle well.
MMAP_THRESHOLD = 256 * 1024
ARENA_MAX = 2


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


def limit_fragmentation() -> None:
    """Call before starting threads."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_ARENA_MAX, ARENA_MAX)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so resident memory reflects what is in use."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
