"""How much of our CPUs other processes are using, from the kernel's counters (Linux; elsewhere: never).

A parallel op waits for its slowest thread, and on a core shared with another busy process a thread
waits a whole scheduler time slice for its turn. With hundreds of parallel ops per step, two threads on
two busy cores are many times slower than one thread (`benchmarks/busy_machine.py`; the figures are in
`benchmarks/README.md`). `CpuContention`
tells the thread policy when others are busy, from `/proc/stat` (busy time of the CPUs we may run on)
minus `/proc/self/stat` (our own), sampled at most once per `window` seconds.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (steal: the hypervisor took it)


@dataclass(frozen=True)
class CpuTimes:
    at: float  # monotonic seconds
    busy: float  # CPU-seconds the allowed CPUs spent busy, everyone's
    ours: float  # CPU-seconds this process used


def read_cpu_times(cpus: frozenset[int], tick: float) -> CpuTimes | None:
    """Busy time of `cpus` and of this process, or None where /proc is not Linux's."""
    try:
        with open("/proc/stat") as f:
            busy = 0
            for line in f:
                name, _, rest = line.partition(" ")
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    values = rest.split()
                    busy += sum(int(values[i]) for i in _BUSY_FIELDS if i < len(values))
        with open("/proc/self/stat") as f:
            # The name field may hold spaces: fields are counted from after its closing parenthesis
            fields = f.read().rpartition(")")[2].split()
        ours = int(fields[11]) + int(fields[12])  # utime, stime of every thread
    except (OSError, ValueError, IndexError):
        return None
    return CpuTimes(time.monotonic(), busy * tick, ours * tick)


class CpuContention:
    """How many of our CPUs other processes leave free: `threads()` is the thread count that fits in them
    (at least 1, at most `cpus`). It drops as soon as others take half a core of what we would use, and
    rises again only once they leave a quarter core more than the next count needs."""

    def __init__(
        self,
        cpus: int | None = None,
        window: float = 1.0,
        sample: Callable[[], CpuTimes | None] | None = None,
    ) -> None:
        allowed = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
        self.cpus = cpus or len(allowed) or os.cpu_count() or 1
        self.window = window
        if sample is None:
            tick = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
            self._sample: Callable[[], CpuTimes | None] = lambda: read_cpu_times(allowed, tick)
        else:
            self._sample = sample
        self._last = self._sample()
        self._due = time.monotonic() + window
        self.others = 0.0  # cores others used over the last window
        self._threads = self.cpus

    def threads(self) -> int:
        """Update from the counters if a window has passed; the thread count that fits beside the others."""
        if self._last is None or time.monotonic() < self._due:
            return self._threads
        self._due = time.monotonic() + self.window
        now = self._sample()
        if now is None or now.at <= self._last.at:
            return self._threads
        elapsed = now.at - self._last.at
        self.others = max(0.0, (now.busy - self._last.busy) - (now.ours - self._last.ours)) / elapsed
        self._last = now
        free = self.cpus - self.others
        fits = max(1, min(self.cpus, math.floor(free + 0.5)))
        if fits > self._threads:  # up only with a margin, so a load near a boundary does not flap
            fits = max(self._threads, min(self.cpus, math.floor(free + 0.25)))
        if fits != self._threads:
            logger.info("other processes use %.1f of %d CPUs: steps run on %d threads", self.others, self.cpus, fits)
            self._threads = fits
        return self._threads
