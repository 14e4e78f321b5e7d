"""Load generation: Poisson arrivals, the concurrency cap, configuration checks, prompt batches."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import statistics

import httpx
import pytest

from tricklm.bench.client import Target
from tricklm.bench.runner import BenchConfig, _prompt_batches, arrival_offsets, run_load
from tricklm.bench.workload import Prompt

DONE_BODY = b'data: {"choices": [{"index": 0, "text": "x", "finish_reason": null}]}\n\ndata: [DONE]\n\n'


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_offsets(4, math.inf, random.Random(0)) == [0.0] * 4


def test_poisson_arrivals_have_the_requested_rate() -> None:
    offsets = arrival_offsets(4000, 20.0, random.Random(0))
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0.0 and all(g > 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 20, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 20, rel=0.1)  # exponential: stdev == mean
    assert arrival_offsets(5, 2.0, random.Random(3)) == arrival_offsets(5, 2.0, random.Random(3))


def test_max_concurrency_caps_requests_in_flight() -> None:
    in_flight, peak = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200, content=DONE_BODY)

    async def go(cap: int | None) -> list[int]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            prompts = [Prompt(f"p{i}") for i in range(9)]
            records = await run_load(client, Target("http://t", "m"), prompts, cap, [0.0] * 9)
        assert all(r.is_ok for r in records)
        return [r.index for r in records]

    assert asyncio.run(go(3)) == list(range(9))
    assert peak == 3
    peak = 0
    asyncio.run(go(None))
    assert peak == 9


def test_open_loop_follows_the_schedule() -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["prompt"])
        return httpx.Response(200, content=DONE_BODY)

    async def go() -> list[float]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            prompts = [Prompt("a"), Prompt("b"), Prompt("c")]
            records = await run_load(client, Target("http://t", "m"), prompts, None, [0.0, 0.3, 0.1])
        return [r.start - records[0].start for r in records]

    starts = asyncio.run(go())
    assert sent == ["a", "c", "b"]
    assert starts[1] >= 0.29 and 0.09 <= starts[2] < 0.28


@pytest.mark.parametrize(
    "kwargs",
    [
        {"endpoint": "images"},
        {"endpoint": "embeddings", "dataset": "multi-turn"},
        {"batch_size": 0},
        {"num_prompts": 0},
        {"output_len": 0},
        {"max_concurrency": 0},
        {"sweep": (1, 0)},
        {"sweep": (1, 2), "max_concurrency": 2},
        {"request_rate": 0.0},
        {"timeout": 0.0},
        {"input_len_spread": 1.5},
        {"warmup": -1},
    ],
)
def test_bad_config(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BenchConfig(base_url="http://t", **kwargs)  # type: ignore[arg-type]


def test_prompt_batches_are_distinct_per_run() -> None:
    config = BenchConfig(base_url="http://t", num_prompts=4, warmup=2, sweep=(1, 2, 4), input_len=8)
    batches = _prompt_batches(config, 1.0)
    assert [len(b) for b in batches] == [2, 4, 4, 4]
    texts = [p.text for b in batches for p in b]
    assert len(set(texts)) == len(texts)
    assert config.concurrencies == [1, 2, 4]
    assert BenchConfig(base_url="http://t", max_concurrency=3).concurrencies == [3]
