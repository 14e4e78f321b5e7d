"""Memory soak: serve with default settings, push 1,000 streaming requests at 16-way concurrency in rounds,
and print the server's resident memory after each round (it must stay flat: within 5% of the first round).
Since the KV cache became resident as it is written, the prefix cache's budget (256 MiB by default) fills
during the first rounds and shows as growth until it is full: read the check against it (a leak keeps
growing after the budget is full; the cache does not).

    .venv/bin/python benchmarks/soak.py [--rounds 10] [--per-round 100] [--output-len 32] [-- serve args]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tricklm.bench.runner import BenchConfig, run_benchmark
from tricklm.server.testing import free_port, wait_healthy


@dataclass
class Served:
    """A `tricklm serve` started by `serving`: its URL, process and command line."""

    base: str
    proc: subprocess.Popen[bytes]
    cmd: list[str]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@contextmanager
def serving(serve_args: list[str]) -> Iterator[Served]:
    """`tricklm serve` on 127.0.0.1 and a free port, once healthy; its process group ends on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "tricklm", "serve", "--port", str(port), "--log-level", "warning", *serve_args]
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, 300, lambda: proc.poll() is None)
        yield Served(base, proc, cmd)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children, in MiB."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (FileNotFoundError, StopIteration):
            continue
    return total / 1024


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=32)
    args, serve_args = parser.parse_known_args()
    with serving(serve_args) as served:
        pid = served.proc.pid
        print(f"command: {' '.join(served.cmd[1:])}\nidle after load: {rss_mib(pid):.0f} MiB")
        samples = []
        for i in range(args.rounds):
            config = BenchConfig(
                base_url=served.base,
                num_prompts=args.per_round,
                max_concurrency=args.concurrency,
                input_len=args.input_len,
                output_len=args.output_len,
                warmup=0,
                seed=i,
                health_path="",
            )
            bench = asyncio.run(run_benchmark(config, progress=False))
            summary = bench.runs[0].summary
            samples.append(rss_mib(pid))
            print(
                f"round {i + 1:2d}: {(i + 1) * args.per_round:5d} requests, {summary.failed} failed, "
                f"{summary.output_throughput:6.1f} tok/s, rss {samples[-1]:.0f} MiB"
            )
        growth = (samples[-1] - samples[0]) / samples[0] * 100
        print(f"rss first round {samples[0]:.0f} MiB, last {samples[-1]:.0f} MiB, growth {growth:+.1f}%")
        return 0 if abs(growth) <= 5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
