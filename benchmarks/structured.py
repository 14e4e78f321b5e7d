"""Structured outputs against free text on one server, same prompts: throughput at 16 streams and schema
compile times (issue 16: constrained throughput >= 90% of unconstrained).

One `tricklm serve`, then `tricklm bench` on chat prompts at 16 concurrent streams, in rounds of two
(interleaved; the ratio reported is the median over rounds), then once more:
- free text, 160 tokens a reply (`ignore_eos`);
- a 10-property JSON schema whose strings are long (`minLength` 60), so that every reply is still inside
  its JSON after 160 tokens: the same number of tokens as the free run, only masked. This ratio is the
  cost of the constraint itself;
- the same schema with ordinary strings, replies ending when their JSON does (lengths vary, so batches
  thin out at the tail): reported as measured, for what a user would see.
Compile times, measured in this process as the server does them: the schema's first compile and the same
schema again (cached); and llguidance's token table, which the engine builds once while loading.

    .venv/bin/python benchmarks/structured.py [--num-prompts 48] [--rounds 3] [-- serve args]
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

from busy_machine import cpu_name
from soak import serving

from tricklm.engine.structured import GrammarCompiler
from tricklm.model.resolve import resolve_model
from tricklm.tokenizer import Tokenizer

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


def long_strings(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with every free string at least 60 characters long (and no more than 200)."""
    if "enum" not in schema and schema.get("type") in ("string", ["string", "null"]):
        return {**schema, "minLength": 60, "maxLength": 200}
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: long_strings(v) for k, v in schema["properties"].items()}
    if "items" in schema:
        out["items"] = long_strings(schema["items"])
    return out


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


def compile_times() -> tuple[float, float, float]:
    """In this process, on the default tokenizer, as the server does them: the token table (built once,
    while the model loads), a schema's first compile, and the same schema again (from the cache)."""
    tokenizer = Tokenizer(resolve_model(None, progress=False))
    compiler = GrammarCompiler(tokenizer.backend_json, tokenizer.vocab_size, sorted(tokenizer.eos_token_ids))
    start = time.perf_counter()
    compiler.tokenizer()
    table = time.perf_counter() - start
    start = time.perf_counter()
    compiler.json_schema(SCHEMA)
    first = time.perf_counter() - start
    start = time.perf_counter()
    compiler.json_schema(json.loads(json.dumps(SCHEMA)))
    cached = time.perf_counter() - start
    return 1000 * table, 1000 * first, 1000 * cached


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args, serve_args = parser.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"]
    table, first, cached = compile_times()
    with serving(serve_args) as served, tempfile.TemporaryDirectory() as tmp:
        natural, long = Path(tmp) / "person.json", Path(tmp) / "person_long.json"
        natural.write_text(json.dumps(SCHEMA))
        long.write_text(json.dumps(long_strings(SCHEMA)))
        pairs = []
        for _ in range(args.rounds):  # interleaved, so that a noisy minute hits both settings
            free = bench(served.base, args.num_prompts, [])
            masked = bench(served.base, args.num_prompts, ["--json-schema", str(long)])
            pairs.append((free, masked))
        ending = bench(served.base, args.num_prompts, ["--json-schema", str(natural), "--no-ignore-eos"])
    print(f"CPU: {cpu_name()}; 16 streams, {args.num_prompts} chat requests a run; serve args {serve_args or '-'}")
    for k, (free, masked) in enumerate(pairs, 1):
        _line(f"free text, round {k}", free)
        _line(f"JSON schema, round {k}", masked)
    _line("JSON schema, as it ends", ending)
    ratios = [masked["output_throughput"] / free["output_throughput"] for free, masked in pairs]
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    print(
        f"constrained / free output throughput, same length: median {statistics.median(ratios):.2f} "
        f"({shown}; target >= 0.90)"
    )
    print(f"schema compile: first {first:.1f} ms, cached {cached:.2f} ms; token table {table:.0f} ms, once at load")


def _line(name: str, s: dict[str, Any]) -> None:
    per_reply = s["total_output_tokens"] / max(1, s["completed"])
    print(
        f"{name:>26}: {s['output_throughput']:7.1f} output tok/s, TPOT p50 {s['tpot_ms']['p50']:6.1f} ms, "
        f"TTFT p50 {s['ttft_ms']['p50']:7.1f} ms, {per_reply:5.1f} tokens a reply, {s['completed']} ok, "
        f"{s['failed']} failed"
    )


if __name__ == "__main__":
    main()
