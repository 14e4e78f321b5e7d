"""`tricklm demo`: the design doc's demonstration, against a real server on a free local port.

1. stream a prompt's tokens to the terminal as they arrive, with per-token timing;
2. time to first visible token, streaming versus non-streaming;
3. /health latency while a generation is running.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any

import httpx

from tricklm.config import EngineConfig
from tricklm.engine.engine import Engine
from tricklm.server.app import create_app
from tricklm.server.testing import running_server


def run_demo(config: EngineConfig, prompt: str, max_tokens: int) -> int:
    print("loading model ...", flush=True)
    engine = Engine(config)
    print(f"loaded {engine.info.model_name} in {engine.info.load_seconds:.1f}s\n")
    try:
        with running_server(create_app(engine=engine)) as base:
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
            stream_ttft = _stream_to_terminal(base, body)
            blocking_ttft = _non_streaming(base, body)
            health = _health_during_generation(base, body)
    finally:
        engine.shutdown()
    print("\n== time to first visible token ==")
    print(f"  streaming:      {stream_ttft * 1000:8.0f} ms")
    print(f"  non-streaming:  {blocking_ttft * 1000:8.0f} ms  (the whole answer arrives at once)")
    print("\n== /health while a generation runs ==")
    print(f"  {len(health)} probes, median {statistics.median(health) * 1000:.1f} ms, max {max(health) * 1000:.1f} ms")
    return 0


def _stream_to_terminal(base: str, body: dict[str, Any]) -> float:
    print(f"prompt: {body['prompt']!r}\n--- streaming /generate ---")
    start = time.monotonic()
    first: float | None = None
    timings: list[float] = []
    last = start
    with httpx.stream("POST", f"{base}/generate", json={**body, "stream": True}, timeout=None) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            now = time.monotonic()
            first = first or now
            timings.append(now - last)
            last = now
            print(event.get("token", ""), end="", flush=True)
    print("\n--- per-token timing (ms) ---")
    print("  first token (prefill + sampling): %.0f" % (timings[0] * 1000 if timings else 0))
    if len(timings) > 1:
        rest = [t * 1000 for t in timings[1:]]
        print(f"  next {len(rest)} tokens: mean {statistics.mean(rest):.1f}, min {min(rest):.1f}, max {max(rest):.1f}")
    return (first or last) - start


def _non_streaming(base: str, body: dict[str, Any]) -> float:
    start = time.monotonic()
    r = httpx.post(f"{base}/generate", json=body, timeout=None)
    r.raise_for_status()
    return time.monotonic() - start


def _health_during_generation(base: str, body: dict[str, Any]) -> list[float]:
    worker = threading.Thread(target=_non_streaming, args=(base, {**body, "max_tokens": max(body["max_tokens"], 48)}))
    worker.start()
    latencies: list[float] = []
    with httpx.Client(timeout=10) as client:
        while worker.is_alive() and len(latencies) < 200:
            t = time.monotonic()
            client.get(f"{base}/health").raise_for_status()
            latencies.append(time.monotonic() - t)
            time.sleep(0.05)
    worker.join()
    return latencies or [0.0]
