"""Load-related guarantees over real sockets: disconnect storms, queue overflow, a dying engine."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_helpers import wait_idle

from agreement import FLOAT_MARGIN, Agreement, Steps, check_texts, completion_steps
from tricklm.config import EngineConfig
from tricklm.engine.engine import Engine
from tricklm.server.app import create_app
from tricklm.server.testing import running_server

COUNTING = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 200, "temperature": 0.0, "ignore_eos": True, "stream": True}


async def _stream_then_leave(client: httpx.AsyncClient, base: str, events_before_leaving: int) -> int:
    seen = 0
    async with client.stream("POST", f"{base}/v1/completions", json=COUNTING) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen >= events_before_leaving:
                    break  # leaving the block closes the connection mid-stream
    return seen


def test_fifty_clients_disconnecting_at_random_points(tiny_server: str, tiny_engine: Engine) -> None:
    rng = random.Random(0)
    points = [rng.randint(1, 30) for _ in range(50)]
    before = tiny_engine.loop.stats().num_generation_tokens

    async def storm() -> list[int]:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(_stream_then_leave(client, tiny_server, p) for p in points))

    seen = asyncio.run(storm())
    assert seen == points
    wait_idle(tiny_engine, 20)
    generated = tiny_engine.loop.stats().num_generation_tokens - before
    assert generated < 50 * 200 / 2, "aborted requests kept generating"
    r = httpx.post(f"{tiny_server}/v1/completions", json={**COUNTING, "stream": False, "max_tokens": 5}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


@pytest.fixture()
def small_queue_server(tiny_model_dir: Path) -> Iterator[tuple[str, Engine]]:
    engine = Engine(EngineConfig(model=str(tiny_model_dir), max_num_seqs=1, max_queue=2), progress=False)
    try:
        with running_server(create_app(engine=engine)) as base:
            yield base, engine
    finally:
        engine.shutdown()


def test_queue_overflow_gives_429_then_recovers(small_queue_server: tuple[str, Engine]) -> None:
    base, engine = small_queue_server
    body = {**COUNTING, "stream": False, "max_tokens": 150}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{base}/v1/completions", json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    # 1 running + 2 waiting fit; a request counts as waiting until the engine thread admits it, so a
    # burst may see the first still waiting when the third arrives
    assert codes.count(200) >= 2 and codes.count(429) >= 1 and codes.count(200) + codes.count(429) == 8, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["Retry-After"]
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    wait_idle(engine, 20)
    ok = httpx.post(f"{base}/v1/completions", json={**body, "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200


POISON = [5, 6, 7, 8, 9, 10]  # a prompt the injected fault recognises


def _poisoned_runner(engine: Engine) -> list[int]:
    """Make every step that holds the POISON prompt raise, as a kernel failing on one input would."""
    real_run = engine.core.runner.run
    failures: list[int] = []

    def run(batch):  # type: ignore[no-untyped-def]
        if any(r.prompt_token_ids == POISON for r in batch.requests):
            failures.append(len(batch.requests))
            raise RuntimeError("simulated kernel failure")
        return real_run(batch)

    engine.core.runner.run = run  # type: ignore[method-assign]
    return failures


def _completion(base: str, prompt: list[int], max_tokens: int = 24) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 5}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=120)


def _answer(r: httpx.Response) -> tuple[str, Steps]:
    choice = r.json()["choices"][0]
    return choice["text"], completion_steps(choice["logprobs"])


def test_failing_step_ends_only_the_request_at_fault(tiny_model_dir: Path) -> None:
    # float32: the good requests, recomputed after the failed step in wider steps than they first ran in, differ
    # from their runs alone only in summation order (the default int4 mode reads a bfloat16 copy of the weights
    # in wide steps, which moves this random model's logits by more than many of its top-2 margins)
    config = EngineConfig(model=str(tiny_model_dir), quantization="none", max_num_seqs=8)
    engine = Engine(config, progress=False)
    prompts = [[20 + i, 30, 40 + i, 50] for i in range(4)]
    try:
        with running_server(create_app(engine=engine)) as base:
            # Long enough replies, and the poison sent once the others run: on a fast CPU 24 tokens of the tiny
            # model were over before the poison arrived, which then failed a step of its own
            max_tokens = 96
            expected = [_answer(_completion(base, p, max_tokens)) for p in prompts]
            failures = _poisoned_runner(engine)

            async def together() -> list[httpx.Response]:
                body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 5}
                async with httpx.AsyncClient(timeout=120) as client:
                    good = [
                        asyncio.create_task(client.post(f"{base}/v1/completions", json={**body, "prompt": p}))
                        for p in prompts
                    ]
                    deadline = time.monotonic() + 10
                    while engine.loop.stats().num_running < len(prompts) and time.monotonic() < deadline:
                        await asyncio.sleep(0.001)
                    bad = await client.post(f"{base}/v1/completions", json={**body, "prompt": POISON})
                    return [*(await asyncio.gather(*good)), bad]

            *good, bad = asyncio.run(together())
            assert max(failures) > 1, "the fault never hit a shared step: the test proves nothing"
            assert failures[-1] == 1, "the request at fault was not run alone"
            assert [r.status_code for r in good] == [200] * 4
            agreement = Agreement(FLOAT_MARGIN)  # recomputed, the same tokens up to a near-tie
            for i, r in enumerate(good):
                check_texts(agreement, _answer(r), expected[i], what=f"recomputed {i}")
            assert bad.status_code == 500 and bad.json()["error"]["code"] == "engine_error"
            assert "RuntimeError" in bad.json()["error"]["message"]  # the class, not internals
            assert httpx.get(f"{base}/health", timeout=5).status_code == 200
            wait_idle(engine, 20)
            check_texts(agreement, _answer(_completion(base, prompts[0], max_tokens)), expected[0], what="after")
            agreement.assert_meaningful(0.75)
            with httpx.stream(
                "POST", f"{base}/generate", json={"prompt": "1, 2", "max_tokens": 5, "stream": True}, timeout=30
            ) as r:
                assert r.status_code == 200
            metrics = httpx.get(f"{base}/metrics", timeout=5).text
            assert re.search(r'^tricklm:request_success_total\{.*finished_reason="error"[^}]*\} 1\.0$', metrics, re.M)
    finally:
        engine.shutdown()


def test_engine_that_cannot_recover_gives_503_and_in_band_error(tiny_model_dir: Path) -> None:
    engine = Engine(EngineConfig(model=str(tiny_model_dir)), progress=False)
    real_step = engine.core.step
    calls = 0

    def failing_step() -> list:  # type: ignore[type-arg]
        nonlocal calls
        calls += 1
        if calls > 5:
            raise RuntimeError("simulated kernel failure")
        return real_step()

    def failing_recover() -> list:  # type: ignore[type-arg]
        raise MemoryError("simulated: no memory to restart")

    try:
        with running_server(create_app(engine=engine)) as base:
            engine.core.step = failing_step  # type: ignore[method-assign]
            engine.core.recover = failing_recover  # type: ignore[method-assign]
            # ignore_eos: the stream must still be running at the sixth step (this random model may end sooner)
            body = {"prompt": "1, 2, 3", "max_tokens": 100, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
            health = httpx.get(f"{base}/health", timeout=5)
            assert health.status_code == 503
            r2 = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=5)
            assert r2.status_code == 503 and r2.json()["error"]["code"] == "engine_unavailable"
            r3 = httpx.post(f"{base}/generate", json={"prompt": "hi"}, timeout=5)
            assert r3.status_code == 503
    finally:
        engine.shutdown()
