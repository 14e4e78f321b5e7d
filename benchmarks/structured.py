"""Structured outputs against free text on one server, same prompts: throughput at 16 streams and schema
compile times (issue 16: constrained throughput >= 90% of unconstrained).

One `tricklm serve`, then `tricklm bench` twice on chat prompts at 16 concurrent streams: free, and with
the 10-property JSON schema below (`--json-schema`). Constrained replies end when their JSON does, so
the figures compared are output tokens per second and time per output token, not request counts.
Compile times: a schema the server has not seen (first request after start, which also builds the
tokenizer's table) and the same schema again (cached), each as the TTFT of a 1-token request minus that
of a free 1-token request with the same prompt.

    .venv/bin/python benchmarks/structured.py [--num-prompts 48] [-- serve args]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from busy_machine import cpu_name
from soak import serving

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 32},
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "enum": ["UK", "US", "FR", "DE"]},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "manager": {"type": ["string", "null"], "maxLength": 24},
        "street": {"type": "string", "maxLength": 32},
    },
    "required": ["name", "age", "email", "city", "country", "score", "active", "tags", "manager", "street"],
    "additionalProperties": False,
}


def bench(base: str, num_prompts: int, extra: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [
            sys.executable, "-m", "tricklm", "bench", "--base-url", base, "--endpoint", "chat",
            "--max-concurrency", "16", "--num-prompts", str(num_prompts), "--input-len", "64",
            "--output-len", "160", "--temperature", "0.8", "--no-progress", "--json-out", str(out), *extra,
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        summary: dict[str, Any] = json.loads(out.read_text())["runs"][0]["summary"]
        return summary


def ttft_ms(client: httpx.Client, base: str, response_format: dict[str, Any] | None) -> float:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Describe a person."}], "max_tokens": 1}
    if response_format is not None:
        body["response_format"] = response_format
    start = time.perf_counter()
    r = client.post(f"{base}/v1/chat/completions", json=body)
    r.raise_for_status()
    return 1000 * (time.perf_counter() - start)


def compile_times(base: str) -> tuple[float, float]:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    with httpx.Client(timeout=120) as client:
        ttft_ms(client, base, None)  # warm the prompt's path and prefix cache
        free = statistics.median(ttft_ms(client, base, None) for _ in range(3))
        first = ttft_ms(client, base, fmt)
        cached = statistics.median(ttft_ms(client, base, fmt) for _ in range(3))
    return first - free, cached - free


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=48)
    args, serve_args = parser.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"]
    with serving(serve_args) as served, tempfile.TemporaryDirectory() as tmp:
        first, cached = compile_times(served.base)
        schema = Path(tmp) / "person.json"
        schema.write_text(json.dumps(SCHEMA))
        free = bench(served.base, args.num_prompts, [])
        constrained = bench(served.base, args.num_prompts, ["--json-schema", str(schema), "--no-ignore-eos"])
    print(f"CPU: {cpu_name()}; 16 streams, {args.num_prompts} chat requests each, serve args {serve_args or '-'}")
    for name, s in (("free text", free), ("10-property JSON schema", constrained)):
        print(
            f"{name:>24}: {s['output_throughput']:7.1f} output tok/s, TPOT p50 {s['tpot_ms']['p50']:6.1f} ms, "
            f"TTFT p50 {s['ttft_ms']['p50']:7.1f} ms, {s['completed']} ok, {s['failed']} failed"
        )
    ratio = constrained["output_throughput"] / free["output_throughput"]
    print(f"constrained / free output throughput: {ratio:.2f} (target >= 0.90)")
    print(f"schema compile, first request: {first:.1f} ms; cached: {cached:.1f} ms (TTFT over a free request)")


if __name__ == "__main__":
    main()
