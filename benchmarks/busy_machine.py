"""A busy machine: 50 short chats sent at once, first on an idle machine, then with CPU hogs running
beside the server (`--hogs 5`: five busy-looping processes, load 5 on 2 cores), for each server setting.
Prints, per setting and phase, how many chats were answered within `--deadline` seconds and their
latencies (p50, p90, max), so thread settings that collapse under contention show up side by side.

    .venv/bin/python benchmarks/busy_machine.py [--hogs 5] [--chats 50] [--deadline 60]
        [--setting "default=" --setting "one-thread=--num-threads 1 --decode-threads 1"]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from soak import serving

HOG = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end: pass\n"


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


@contextmanager
def hogs(count: int, limit: float) -> Iterator[None]:
    """`count` busy-looping processes, each ending by itself after `limit` seconds at the latest."""
    procs = [subprocess.Popen([sys.executable, "-c", HOG.format(limit=limit)]) for _ in range(count)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


async def chats(base: str, count: int, max_tokens: int, deadline: float) -> list[float | None]:
    """Send `count` chats at once; each one's latency, or None if unanswered within `deadline`."""

    async def one(client: httpx.AsyncClient, i: int) -> float | None:
        body = {
            "messages": [{"role": "user", "content": f"Give me one short fact about the number {i}."}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
        }
        start = time.monotonic()
        try:
            r = await client.post("/v1/chat/completions", json=body)
        except httpx.TimeoutException:
            return None
        return time.monotonic() - start if r.status_code == 200 else None

    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=base, timeout=deadline, limits=limits) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(count))))


def describe(latencies: list[float | None], deadline: float) -> str:
    done = sorted(x for x in latencies if x is not None)
    if not done:
        return f"0/{len(latencies)} answered within {deadline:g} s"
    p90 = done[min(len(done) - 1, int(0.9 * len(done)))]
    return (
        f"{len(done)}/{len(latencies)} answered within {deadline:g} s; latency p50 {statistics.median(done):.1f} s, "
        f"p90 {p90:.1f} s, max {done[-1]:.1f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hogs", type=int, default=5)
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--setting", action="append", default=[], help="NAME=SERVE ARGS (repeatable)")
    args = parser.parse_args()
    settings = args.setting or ["default=", "one-thread=--num-threads 1 --decode-threads 1"]
    print(f"# {cpu_name()}, {os.cpu_count()} CPUs; {args.chats} chats at once, max_tokens {args.max_tokens}")
    for setting in settings:
        name, _, serve_args = setting.partition("=")
        with serving(shlex.split(serve_args)) as served:
            asyncio.run(chats(served.base, 4, 4, args.deadline))  # warm-up
            idle = asyncio.run(chats(served.base, args.chats, args.max_tokens, args.deadline))
            with hogs(args.hogs, args.deadline + 30):
                busy = asyncio.run(chats(served.base, args.chats, args.max_tokens, args.deadline))
        print(f"{name:12s} idle machine: {describe(idle, args.deadline)}")
        print(f"{'':12s} {args.hogs} CPU hogs:  {describe(busy, args.deadline)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
