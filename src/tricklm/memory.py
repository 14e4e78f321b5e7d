"""Memory housekeeping, in one place: glibc malloc settings for a long-running server, and the two moments the
engine hands memory back: `after_load` (once the model is in) and `after_step` (after a long step). Loading itself
trims its own staging buffers as it goes (`release_freed_memory`), to keep its peak near the model's size.

Two threads allocate here (the event loop and the engine). glibc gives each thread its own arena by
default, and every arena keeps its own freed pages resident, so we cap them at two.

Blocks of 4 MiB or more get their own mapping, handed back to the OS when freed. Left to glibc, the
threshold climbs to 32 MiB, and a prefill chunk's activations (8-16 MiB a tensor for a 1.7B model) land
in freed holes all over the heap, which stay resident: serving 16 streams of the 1.7B shape peaked
higher than with this setting (`benchmarks/serve_memory.py`), for the same live tensors. A much lower
threshold is slow: at 256 KiB every decode step's tensors were fresh mappings, and their page faults
made a 16-sequence step far slower (`benchmarks/engine_steps.py`; the figures of both:
`benchmarks/README.md`). At 4 MiB, decode steps' tensors (16 rows) stay on the heap, and a
tensor big enough to be mapped belongs to a step that computes for far longer than its page faults take.
Fixing the threshold turns off glibc's own adjustment of the trim threshold too, so that one is set
to what glibc would pair with it: without it, the heap's top would be handed back and faulted in
again at every step.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENA_MAX = 2
# A step this long or longer is followed by a trim, whose cost is small against it (benchmarks/README.md): a step's
# activations are tensors of a few MiB, which land on the heap between longer-lived objects; the holes they leave
# stay resident, and the next step's tensors, of other sizes, make more, which raised the serving peak
# (benchmarks/serve_memory.py).
TRIM_AFTER_SECONDS = 0.05
MMAP_THRESHOLD = 4 * 2**20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # glibc's dynamic pairing: twice the mmap threshold


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
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so resident memory reflects what is in use."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)


def after_load() -> None:
    """Once the model and tokenizer are in: what is loaded now lives as long as the engine. Frozen, it is out of
    the cyclic collector's walks, which otherwise visit the tokenizer's and the model's objects in every full
    collection while serving (a measurable share of a prefill step: benchmarks/README.md); refcounting still frees
    frozen objects. Then the load's freed heap goes back to the OS. `forget_load` undoes the freeze."""
    gc.collect()
    gc.freeze()
    release_freed_memory()


def forget_load() -> None:
    """When an engine shuts down: a process that makes another (tests, benchmarks) can collect this one's cycles."""
    gc.unfreeze()


def after_step(seconds: float) -> None:
    """After every engine step, which took `seconds`: hands freed heap back after a long one."""
    if seconds >= TRIM_AFTER_SECONDS:
        release_freed_memory()
