"""Prefix caching as clients see it: `usage.prompt_tokens_details.cached_tokens` and /metrics counters."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_helpers import sse_payloads

from agreement import FLOAT_MARGIN, Agreement, check_texts, completion_steps
from tricklm.config import EngineConfig
from tricklm.engine.engine import Engine
from tricklm.server.app import create_app
from tricklm.server.testing import running_server


@pytest.fixture(scope="module")
def float_tiny_server(tiny_model_dir: Path) -> Iterator[str]:
    """The tiny Llama in float32: a cached prefix and a fresh prefill differ only in summation order. The default
    int4 mode prefills wide steps from a bfloat16 copy of the weights (where the CPU runs that faster) and the
    rest of a cached prefix from packed fp16, which moves this random model's logits by more than many of its
    top-2 margins."""
    engine = Engine(EngineConfig(model=str(tiny_model_dir), quantization="none"), progress=False)
    try:
        with running_server(create_app(engine=engine)) as base:
            yield base
    finally:
        engine.shutdown()


def _prompt(seed: int, n: int = 60) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


def test_cached_tokens_in_whole_and_streamed_usage(float_tiny_server: str) -> None:
    prompt = _prompt(12345)
    body = {"prompt": prompt, "max_tokens": 3, "ignore_eos": True, "temperature": 0, "logprobs": 5}
    first = httpx.post(float_tiny_server + "/v1/completions", json=body, timeout=60).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    again = httpx.post(float_tiny_server + "/v1/completions", json=body, timeout=60).json()
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 48}  # 3 full blocks of 16
    streamed = httpx.post(
        float_tiny_server + "/v1/completions",
        json={**body, "prompt": [*prompt, 7], "stream": True, "stream_options": {"include_usage": True}},
        timeout=60,
    )
    usage = [p["usage"] for p in sse_payloads(streamed.content) if p.get("usage")]
    assert usage[-1]["prompt_tokens_details"] == {"cached_tokens": 48}
    # The cached prefix was computed in the first call's prefill, the rest of the prompt now in a step of its own
    agreement = Agreement(FLOAT_MARGIN)
    answers = [(r["choices"][0]["text"], completion_steps(r["choices"][0]["logprobs"])) for r in (again, first)]
    check_texts(agreement, *answers, what="cached")
    agreement.assert_meaningful(0.6)


def test_chat_turns_hit_and_metrics_count_them(tiny_server: str) -> None:
    def hits() -> float:
        text = httpx.get(tiny_server + "/metrics").text
        line = next(ln for ln in text.splitlines() if ln.startswith("tricklm:prefix_cache_hits_total"))
        return float(line.split()[-1])

    before = hits()
    history = [{"role": "user", "content": " ".join(f"word{i}" for i in range(40))}]
    body = {"messages": history, "max_tokens": 4, "ignore_eos": True}
    reply = httpx.post(tiny_server + "/v1/chat/completions", json=body, timeout=60).json()
    history += [reply["choices"][0]["message"], {"role": "user", "content": "and then?"}]
    turn2 = httpx.post(tiny_server + "/v1/chat/completions", json={**body, "messages": history}, timeout=60).json()
    cached = turn2["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 16 and cached % 16 == 0
    assert hits() - before >= cached
    assert json.dumps(turn2["usage"])  # plain JSON numbers
