"""Replicas on Ray Serve against one server, on this machine (issue 19).

Three servers in turn, each measured by `tricklm bench` (completions, 64-token prompts, 128 tokens a reply)
at 1 and at 16 concurrent streams, then with multi-turn chats (8 conversations of 4 turns, a shared
system prompt) to show how much of each prompt the replicas' prefix caches found:
- `tricklm serve --num-threads 2`: one engine, no Ray;
- `tricklm serve --replicas 1 --cpus-per-replica 2`: the same engine behind Ray's proxy and our gateway;
- `tricklm serve --replicas 2 --cpus-per-replica 1`: two engines of one core each.
The proxy's cost per token is the difference in ITL p50 between the first two (the same engine), at 1 and
at 16 streams.

    .venv/bin/python benchmarks/replicas.py [--num-prompts 48]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from busy_machine import cpu_name

from tricklm.server.testing import free_port, wait_healthy

SETUPS = {
    "one server, 2 threads": ["--num-threads", "2"],
    "Ray: 1 replica x 2 CPUs": ["--replicas", "1", "--cpus-per-replica", "2"],
    "Ray: 2 replicas x 1 CPU": ["--replicas", "2", "--cpus-per-replica", "1"],
}


@contextlib.contextmanager
def serving(args: list[str]) -> Iterator[str]:
    """A server, stopped by SIGTERM to its own process (with Ray, the driver shuts Ray down itself)."""
    port = free_port()
    cmd = [sys.executable, "-m", "tricklm", "serve", "--port", str(port), "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, 600, lambda: proc.poll() is None)
        replicas = int(args[args.index("--replicas") + 1]) if "--replicas" in args else 0
        while replicas and httpx.get(base + "/health", timeout=10).json().get("replicas", 0) < replicas:
            wait_healthy(base, 60, lambda: proc.poll() is None)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def bench(base: str, extra: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [
            sys.executable, "-m", "tricklm", "bench", "--base-url", base, "--input-len", "64",
            "--output-len", "128", "--no-progress", "--json-out", str(out), *extra,
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        summary: dict[str, Any] = json.loads(out.read_text())["runs"][0]["summary"]
        return summary


def prefix_hit_rate(base: str) -> float:
    """Prefix-cache hits / lookups (in tokens) over every replica, from the endpoint's /metrics."""
    totals = {"tricklm:prefix_cache_hits_total": 0.0, "tricklm:prefix_cache_queries_total": 0.0}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["tricklm:prefix_cache_hits_total"] / max(1.0, totals["tricklm:prefix_cache_queries_total"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=48)
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    for name, serve_args in SETUPS.items():
        with serving(serve_args) as base:
            one = bench(base, ["--max-concurrency", "1", "--num-prompts", "8"])
            many = bench(base, ["--max-concurrency", "16", "--num-prompts", str(args.num_prompts)])
            before = prefix_hit_rate(base)
            chats = bench(
                base,
                ["--endpoint", "chat", "--dataset", "multi-turn", "--num-prompts", "8", "--turns", "4",
                 "--system-prompt-len", "200", "--max-concurrency", "8", "--output-len", "48"],
            )  # fmt: skip
            results[name] = {"1": one, "16": many, "chats": chats, "hits": prefix_hit_rate(base), "before": before}
    print(f"CPU: {cpu_name()}; completions, 64-token prompts, 128 tokens a reply")
    print(f"{'':>26} | {'1 stream: tok/s  TTFT p50  ITL p50':>36} | {'16 streams: tok/s  TTFT p50  p99  ITL p50':>44}")
    for name, r in results.items():
        print(f"{name:>26} | {_cells(r['1'], p99=False):>36} | {_cells(r['16'], p99=True):>44}")
    direct, proxied = results["one server, 2 threads"], results["Ray: 1 replica x 2 CPUs"]
    for level in ("1", "16"):
        extra = proxied[level]["itl_ms"]["p50"] - direct[level]["itl_ms"]["p50"]
        print(f"proxy + gateway cost per token at {level} stream(s): {extra:+.2f} ms ITL p50 (same engine)")
    print("multi-turn chats (8 conversations x 4 turns, 8 at once, shared 200-token system prompt):")
    for name, r in results.items():
        c = r["chats"]
        print(
            f"{name:>26}: {c['output_throughput']:6.1f} tok/s, TTFT p50 {c['ttft_ms']['p50']:6.1f} ms; "
            f"prefix-cache hit rate over the run {r['hits']:.2f} (before the chats {r['before']:.2f})"
        )


def _cells(s: dict[str, Any], p99: bool) -> str:
    tail = f" {s['ttft_ms']['p99']:7.0f}" if p99 else ""
    return (
        f"{s['output_throughput']:7.1f} {s['ttft_ms']['p50']:8.0f} ms{tail} {s['itl_ms']['p50']:6.1f} ms"
        f" ({s['failed']} failed)"
    )


if __name__ == "__main__":
    main()
