"""glibc malloc settings for a long-running server.

Two threads allocate here (the event loop and the engine). glibc gives each thread its own arena by
default, and every arena keeps its own freed pages resident, so we cap them at two.

The mmap threshold is left to glibc on purpose. A fixed low threshold (we tried 256 KiB) sends every
step-sized tensor to a fresh mmap, and the page faults on first touch doubled a 16-sequence decode
step (147 against 73 ms median, `benchmarks/engine_steps.py`). glibc's dynamic threshold keeps those buffers
on the heap, where the next step reuses them.
"""

from __future__ import annotations

import contextlib
import ctypes

_M_ARENA_MAX = -8
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


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so resident memory reflects what is in use."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
