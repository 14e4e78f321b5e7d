"""The same workload through chat completions, Anthropic's Messages and OpenAI's Responses, one server.

Each API is a protocol module and a renderer over the same engine path, so their throughput should match;
this measures it. One `tricklm serve` (the default model unless `--model`), then `tricklm bench` on each
endpoint in turn after an untimed warm-up, the order rotated each round so that drift (a busy neighbour)
falls on all three; printed: output tok/s, TTFT p50/p99 and ITL p50 per endpoint and level, and each API's
throughput over chat's in the same round.

    .venv/bin/python benchmarks/api_overhead.py --rounds 2 --sweep 1,16 --num-prompts 32 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ENDPOINTS = ("chat", "messages", "responses")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: str | None, port: int, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "tricklm", "serve", "--host", "127.0.0.1", "--port", str(port), *extra]
    if model:
        cmd += ["--model", model]
    return wait_healthy(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port)


@contextmanager
def stopping(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """`proc`, terminated (and waited for) however the block ends."""
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@contextmanager
def serving(model: str | None, *extra: str) -> Iterator[str]:
    """A `tricklm serve` of `model` (None: the default) on a free port, healthy: its base URL, stopped after."""
    port = free_port()
    with stopping(start_server(model, port, *extra)):
        yield f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout: float = 300) -> subprocess.Popen[bytes]:
    """`proc` once its /health on `port` answers 200 (it is killed, and the benchmark ends, if it exits or
    does not within `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not become healthy within {timeout:g} s")


def bench(base: str, endpoint: str, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "tricklm", "bench", "--base-url", base, "--endpoint", endpoint, "--no-progress"]
    cmd += ["--sweep", args.sweep, "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len)]
    cmd += ["--output-len", str(args.output_len), "--json-out", str(out), "--seed", "0"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    return list(json.loads(out.read_text())["runs"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sweep", default="1,16")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=64)
    args = p.parse_args()
    print(f"CPU: {cpu_name()}, TRICKLM_ISA={os.environ.get('TRICKLM_ISA', '(auto: the best this CPU has)')}")
    rows = []
    with serving(args.model) as base, tempfile.TemporaryDirectory() as tmp:
        # Every run sends the same prompts: one untimed run first, so that every measured run finds
        # them in the prefix cache and the rounds differ only by the API
        bench(base, "chat", args, Path(tmp) / "warmup.json")
        for r in range(args.rounds):
            order = ENDPOINTS[r % 3 :] + ENDPOINTS[: r % 3]
            for endpoint in order:
                for run in bench(base, endpoint, args, Path(tmp) / f"{endpoint}-{r}.json"):
                    s = run["summary"]
                    rows.append((r, endpoint, run["max_concurrency"], s))
    head = (
        "round",
        "endpoint",
        "streams",
        "out tok/s",
        "vs chat",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "ITL p50 (ms)",
        "failed",
    )
    print("| " + " | ".join(head) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    chat = {(r, c): s["output_throughput"] for r, e, c, s in rows if e == "chat"}
    for r, endpoint, conc, s in rows:
        ratio = s["output_throughput"] / chat[(r, conc)] if chat.get((r, conc)) else float("nan")
        print(
            f"| {r} | {endpoint} | {conc} | {s['output_throughput']:.1f} | {ratio:.3f} | {s['ttft_ms']['p50']:.0f} "
            f"| {s['ttft_ms']['p99']:.0f} | {s['itl_ms']['p50']:.1f} | {s['failed']} |"
        )


if __name__ == "__main__":
    main()
