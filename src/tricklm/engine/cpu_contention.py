"""How much of our CPUs other processes are using, from the kernel's counters (Linux; elsewhere: never).

A parallel op waits for its slowest thread, and on a core shared with another busy process a thread
waits a whole scheduler time slice for its turn. With hundreds of parallel ops per step, two threads on
two busy cores measured 4.6–35 s for 50 short chats against 1.3–4.3 s with one thread. `CpuContention`
tells the thread policy when others are busy, from `/proc/stat` (busy time of the CPUs we may run on)
minus `/proc/self/stat` (our own), sampled at most once per `window` seconds.
"""

from __future__ import annotations

import logging
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
    """Whether other processes are busy on our CPUs: on above `enter` cores, off again below `leave`."""

    def __init__(
        self,
        window: float = 1.0,
        enter: float = 0.5,
        leave: float = 0.25,
        sample: Callable[[], CpuTimes | None] | None = None,
    ) -> None:
        self.window, self.enter, self.leave = window, enter, leave
        if sample is None:
            cpus = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
            tick = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
            self._sample: Callable[[], CpuTimes | None] = lambda: read_cpu_times(cpus, tick)
        else:
            self._sample = sample
        self._last = self._sample()
        self._due = time.monotonic() + window
        self.contended = False
        self.others = 0.0  # cores others used over the last window

    def check(self) -> bool:
        """Update from the counters if a window has passed; True while others are busy."""
        if self._last is None or time.monotonic() < self._due:
            return self.contended
        self._due = time.monotonic() + self.window
        now = self._sample()
        if now is None or now.at <= self._last.at:
            return self.contended
        elapsed = now.at - self._last.at
        self.others = max(0.0, (now.busy - self._last.busy) - (now.ours - self._last.ours)) / elapsed
        self._last = now
        was = self.contended
        self.contended = self.others >= self.enter if not was else self.others >= self.leave
        if self.contended != was:
            if self.contended:
                logger.info("other processes are using %.1f CPUs: running on one thread while they do", self.others)
            else:
                logger.info("the CPUs are free again (others use %.1f): back to every thread", self.others)
        return self.contended
