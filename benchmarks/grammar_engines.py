"""xgrammar against llguidance on our workload: compile time and per-step mask time, default tokenizer.

The workload is what a constrained request costs the engine: compiling its schema once (first and cached),
then, every decode step, filling a token bitmask for each constrained row of the batch and advancing each
matcher by the sampled token. Both engines walk the same valid JSON document token by token, 16 rows at a
time, so the mask time per step is what a 16-stream constrained batch adds to a forward pass.

    .venv/bin/pip install xgrammar llguidance   # xgrammar is not a dependency; this script compares
    .venv/bin/python benchmarks/grammar_engines.py
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tricklm.model.resolve import resolve_model
from tricklm.tokenizer import Tokenizer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "city": {"type": "string"},
        "country": {"type": "string", "enum": ["UK", "US", "FR", "DE"]},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "manager": {"type": ["string", "null"]},
        "address": {"type": "object", "properties": {"street": {"type": "string"}}, "required": ["street"]},
    },
    "required": ["name", "age", "email", "city", "country", "score", "active", "tags", "manager", "address"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "city": "London",
    "country": "UK",
    "score": 9.5,
    "active": True,
    "tags": ["maths", "engines"],
    "manager": None,
    "address": {"street": "St James's Square"},
}
ROWS = 16


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_llguidance(tok: Tokenizer, tokens: list[int]) -> dict[str, float]:
    import llguidance

    lltok, setup = timed(lambda: llguidance.LLTokenizer(tok.backend_json(), n_vocab=tok.vocab_size))
    schema = json.dumps(SCHEMA)

    def compile_once() -> Any:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        return grammar, llguidance.LLMatcher(lltok, grammar, log_level=0)

    (grammar, first), first_s = timed(compile_once)
    # "Cached": the grammar text is kept; each request only builds a matcher from it
    _, cached_s = timed(lambda: llguidance.LLMatcher(lltok, grammar, log_level=0))
    matchers = [llguidance.LLMatcher(lltok, grammar, log_level=0) for _ in range(ROWS)]
    mask = np.zeros((ROWS, (tok.vocab_size + 31) // 32), dtype=np.int32)
    steps = []
    for t in tokens:
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(mask[i].ctypes.data, mask[i].nbytes)
        for m in matchers:
            assert m.consume_token(t), m.get_error()
        steps.append(time.perf_counter() - start)
    del first
    return {"tokenizer setup s": setup, "compile s": first_s, "cached s": cached_s, **_step_stats(steps)}


def bench_xgrammar(tok: Tokenizer, tokens: list[int]) -> dict[str, float]:
    import torch
    import xgrammar as xgr

    def info() -> Any:
        vocab = [tok.id_to_token(i) for i in range(tok.vocab_size)]
        return xgr.TokenizerInfo(
            vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.eos_token_ids)
        )

    tinfo, setup = timed(info)
    compiler = xgr.GrammarCompiler(tinfo, max_threads=1, cache_enabled=True)
    schema = json.dumps(SCHEMA)
    compiled, first_s = timed(lambda: compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":")))
    _, cached_s = timed(lambda: compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":")))
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(ROWS)]
    mask = torch.zeros((ROWS, (tok.vocab_size + 31) // 32), dtype=torch.int32)
    steps = []
    for t in tokens:
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(mask, i)
        for m in matchers:
            assert m.accept_token(t)
        steps.append(time.perf_counter() - start)
    return {"tokenizer setup s": setup, "compile s": first_s, "cached s": cached_s, **_step_stats(steps)}


def _step_stats(steps: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in steps)
    return {"mask+advance per step, 16 rows: median ms": statistics.median(ms), "p99 ms": ms[int(0.99 * len(ms))]}


def main() -> None:
    tok = Tokenizer(resolve_model(None, progress=False))
    tokens = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    print(f"CPU: {_cpu()}; vocabulary {tok.vocab_size}; document {len(tokens)} tokens; {ROWS} rows")
    for name, bench in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        try:
            figures = bench(tok, tokens)
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
