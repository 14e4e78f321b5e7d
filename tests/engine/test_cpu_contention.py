"""Other processes busy on our CPUs switch the default thread policy to one thread, and back."""

from __future__ import annotations

import os
import time

import pytest
import torch

from tricklm.engine.cpu_contention import CpuContention, CpuTimes, read_cpu_times
from tricklm.engine.model_runner import ThreadPolicy


class FakeCounters:
    """CPU counters advanced by hand: each `advance` is one window in which others used `others` cores."""

    def __init__(self) -> None:
        self.now = CpuTimes(time.monotonic(), 0.0, 0.0)

    def sample(self) -> CpuTimes:
        return self.now

    def advance(self, others: float, ours: float = 1.0, seconds: float = 1.0) -> None:
        n = self.now
        self.now = CpuTimes(n.at + seconds, n.busy + (others + ours) * seconds, n.ours + ours * seconds)


def test_threads_follow_the_cores_others_leave_free_with_hysteresis() -> None:
    counters = FakeCounters()
    monitor = CpuContention(cpus=2, window=0.0, sample=counters.sample)
    readings = []
    for others in (0.1, 0.9, 0.4, 0.3, 0.2, 0.6):
        counters.advance(others)
        readings.append(monitor.threads())
    # 0.4 and 0.3 would round to 2 free cores, but going back up needs a quarter core of margin
    assert readings == [2, 1, 1, 1, 2, 1]
    assert monitor.others == pytest.approx(0.6)


def test_a_big_machine_loses_only_the_cores_others_take() -> None:
    counters = FakeCounters()
    monitor = CpuContention(cpus=32, window=0.0, sample=counters.sample)
    counters.advance(0.6)  # a monitoring agent
    assert monitor.threads() == 31
    counters.advance(40.0)  # more than the machine: one thread, never zero
    assert monitor.threads() == 1


def test_counters_are_read_at_most_once_a_window() -> None:
    counters = FakeCounters()
    monitor = CpuContention(cpus=2, window=3600.0, sample=counters.sample)
    counters.advance(2.0)
    assert monitor.threads() == 2  # the window has not passed on the real clock: no new reading


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux counters")
def test_the_kernel_counters_read_sensibly() -> None:
    cpus = frozenset(os.sched_getaffinity(0))
    first = read_cpu_times(cpus, 1.0 / os.sysconf("SC_CLK_TCK"))
    end = time.process_time() + 0.3
    while time.process_time() < end:  # busy ourselves: our time grows, and counts in the total
        pass
    second = read_cpu_times(cpus, 1.0 / os.sysconf("SC_CLK_TCK"))
    assert first is not None and second is not None
    assert second.ours - first.ours >= 0.2
    assert second.busy - first.busy >= second.ours - first.ours - 0.05  # ticks round


def test_the_default_policy_runs_one_thread_while_others_are_busy() -> None:
    counters = FakeCounters()
    monitor = CpuContention(cpus=2, window=0.0, sample=counters.sample)
    policy = ThreadPolicy(2, contention=monitor)
    before = torch.get_num_threads()
    try:
        counters.advance(0.0)
        policy.apply(num_tokens=256)
        assert torch.get_num_threads() == 2
        counters.advance(1.5)
        policy.apply(num_tokens=256)
        assert torch.get_num_threads() == 1
        counters.advance(0.0)
        policy.apply(num_tokens=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_chosen_thread_counts_are_left_alone() -> None:
    assert ThreadPolicy(2).contention is None
    assert ThreadPolicy(None, decode_threads=1).contention is None
    assert ThreadPolicy(None).contention is not None or (os.cpu_count() or 1) == 1
