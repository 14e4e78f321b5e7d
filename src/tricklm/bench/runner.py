"""Driving the load: warm-up, closed loop (`max_concurrency` workers) or open loop (Poisson arrivals at
`request_rate`, optionally capped by `max_concurrency`), a health probe alongside, and sweeps over concurrency.

Every run is bounded: `num_prompts` requests, each cut off after `timeout` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from tricklm.bench.client import (
    ENCODER_ENDPOINTS,
    BenchError,
    HealthProbe,
    Target,
    count_tokens,
    first_model_id,
    normalize_base_url,
    send_request,
    speculation_counters,
)
from tricklm.bench.conversation import Conversation, make_conversations, run_conversations
from tricklm.bench.metrics import HealthSample, RequestRecord, Summary, summarize
from tricklm.bench.workload import (
    CALIBRATION_WORDS,
    PROMPT_SETS,
    Prompt,
    calibration_text,
    random_prompts,
    real_prompts,
)

log = logging.getLogger(__name__)

ENDPOINTS = ("completions", "chat", "messages", "responses", "embeddings", "rerank")
DATASETS = ("random", "prompts", "rewrite", "multi-turn")
PROBE_GRACE_S = 5.0  # how long the health probe in flight at the end of a run may take to answer


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark needs; the CLI reads its defaults from here."""

    base_url: str
    model: str | None = None  # None: the first id of GET /v1/models
    endpoint: str = "completions"
    dataset: str = "random"
    num_prompts: int = 64
    input_len: int = 128
    input_len_spread: float = 0.0
    output_len: int = 128
    max_concurrency: int | None = None
    request_rate: float = math.inf
    sweep: tuple[int, ...] = ()
    warmup: int = 2
    seed: int = 0
    timeout: float = 300.0
    ignore_eos: bool = True
    temperature: float = 0.0
    health_path: str = "/health"  # "" disables the probe
    health_interval: float = 0.1
    calibrate: bool = True
    turns: int = 4  # multi-turn: user turns per conversation (num_prompts is the number of conversations)
    system_prompt_len: int = 0  # multi-turn: tokens of the system prompt every conversation shares
    response_format: str = "text"  # "json_object": every request asks for JSON
    json_schema: Path | None = None  # every request asks for JSON valid against this schema file
    batch_size: int = 1  # embeddings and rerank: texts a request

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS or self.dataset not in DATASETS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS} and dataset one of {DATASETS}")
        if self.endpoint in ENCODER_ENDPOINTS and self.dataset == "multi-turn":
            raise ValueError(f"{self.endpoint} takes texts, not conversations: --dataset random, prompts or rewrite")
        for name in ("num_prompts", "input_len", "output_len", "turns", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.warmup < 0 or not 0 <= self.input_len_spread < 1:
            raise ValueError("warmup must be 0 or more and input_len_spread in [0, 1)")
        if (self.max_concurrency is not None and self.max_concurrency < 1) or any(c < 1 for c in self.sweep):
            raise ValueError("concurrencies must be at least 1")
        if self.sweep and self.max_concurrency is not None:
            raise ValueError("give either --sweep or --max-concurrency, not both")
        if not self.request_rate > 0 or not self.timeout > 0 or not self.health_interval > 0:
            raise ValueError("request_rate, timeout and health_interval must be positive")
        if self.system_prompt_len < 0:
            raise ValueError("system_prompt_len must be 0 or more")

    @property
    def concurrencies(self) -> list[int | None]:
        return list(self.sweep) if self.sweep else [self.max_concurrency]


@dataclass
class RunResult:
    """One measured run at one load level."""

    max_concurrency: int | None
    request_rate: float
    start: float
    duration_s: float
    prompts: list[Prompt]
    records: list[RequestRecord]
    health: list[HealthSample]
    is_health_supported: bool
    # Draft tokens verified and kept during the run (the server's speculative-decoding counters), if it has them
    speculation: tuple[float, float] | None = None
    summary: Summary = field(init=False)

    def __post_init__(self) -> None:
        self.summary = summarize(self.records, self.duration_s, self.health)


@dataclass(frozen=True)
class Benchmark:
    """A finished benchmark: its settings as run (model resolved) and one result per load level."""

    config: BenchConfig
    tokens_per_word: float | None
    runs: list[RunResult]


# ---- load generation -----------------------------------------------------------------------------


def arrival_offsets(num: int, request_rate: float, rng: random.Random) -> list[float]:
    """Send times (seconds from the start) of a Poisson process at `request_rate`; all 0 when infinite."""
    if math.isinf(request_rate):
        return [0.0] * num
    offsets, t = [], 0.0
    for _ in range(num):
        offsets.append(t)
        t += rng.expovariate(request_rate)
    return offsets


async def run_load(
    client: httpx.AsyncClient,
    target: Target,
    prompts: Sequence[Prompt],
    max_concurrency: int | None,
    offsets: Sequence[float],
    on_done: Callable[[], object] = lambda: None,
) -> list[RequestRecord]:
    """Send `prompts[i]` at `offsets[i]` (or later, once one of `max_concurrency` slots is free)."""
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    async def one(index: int, prompt: Prompt, offset: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        async with gate or contextlib.nullcontext():
            record = await send_request(client, target, list(prompt.texts) or prompt.text, index)
        on_done()
        return record

    return list(await asyncio.gather(*(one(i, p, t) for i, (p, t) in enumerate(zip(prompts, offsets, strict=True)))))


Work = list[Prompt] | list[Conversation]


async def measure(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
    config: BenchConfig,
    target: Target,
    work: Work,
    max_concurrency: int | None,
    progress: bool,
) -> RunResult:
    """One measured run with the health probe alongside; `clients` = (requests, health probe). `work` is
    prompts, or conversations (sent turn by turn, `max_concurrency` conversations at a time)."""
    conversations = [w for w in work if isinstance(w, Conversation)]
    if conversations:
        prompts = [Prompt(text, config.input_len) for c in conversations for text in c.user_turns]
    else:
        prompts = [w for w in work if isinstance(w, Prompt)]
    offsets = arrival_offsets(len(prompts), config.request_rate, random.Random(config.seed))
    health_url = config.base_url + "/" + config.health_path.lstrip("/")
    probe = HealthProbe(clients[1], health_url, config.health_interval, config.timeout)
    probe_task = asyncio.create_task(probe.run()) if config.health_path else None
    label = f"concurrency {max_concurrency}" if max_concurrency else f"rate {config.request_rate:g}/s"
    assert config.model is not None
    spec_before = await speculation_counters(clients[1], config.base_url, config.model)
    with tqdm(total=len(prompts), desc=label, unit="req", file=sys.stderr, disable=not progress) as bar:
        start = time.perf_counter()
        if conversations:
            records = await run_conversations(clients[0], target, conversations, max_concurrency, bar.update)
        else:
            records = await run_load(clients[0], target, prompts, max_concurrency, offsets, bar.update)
        duration = time.perf_counter() - start
    if probe_task is not None:
        # A probe sent just before the load ended gets its answer (within a grace period) rather than
        # counting as failed; one still unanswered after that is cancelled and counts as failed.
        probe.stop()
        await asyncio.wait({probe_task}, timeout=PROBE_GRACE_S)
        probe_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe_task
    health = probe.finish()
    spec_after = await speculation_counters(clients[1], config.base_url, config.model)
    speculation = None
    if spec_before is not None and spec_after is not None:
        speculation = (spec_after[0] - spec_before[0], spec_after[1] - spec_before[1])
    return RunResult(
        max_concurrency, config.request_rate, start, duration, prompts, records, health, probe.is_supported, speculation
    )


# ---- a whole benchmark ---------------------------------------------------------------------------


async def run_benchmark(config: BenchConfig, progress: bool = True) -> Benchmark:
    """Resolve the model, build prompts, warm up, then measure each load level in turn."""
    config = replace(config, base_url=normalize_base_url(config.base_url))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits) as client, httpx.AsyncClient() as health_client:
        if config.model is None:
            config = replace(config, model=await first_model_id(client, config.base_url, config.endpoint))
        target = _target(config)
        tokens_per_word = await _calibrate(client, config) if config.calibrate else None
        batches = _prompt_batches(config, tokens_per_word or 1.0)
        await _warm_up(client, target, batches[0], config)
        work: list[Work] = list(batches[1:])
        if config.dataset == "multi-turn":
            work = _conversation_batches(config, tokens_per_word or 1.0)
        runs = []
        for level, load in zip(config.concurrencies, work, strict=True):
            runs.append(await measure((client, health_client), config, target, load, level, progress))
    return Benchmark(config, tokens_per_word, runs)


def _target(config: BenchConfig) -> Target:
    assert config.model is not None
    return Target(
        base_url=config.base_url,
        model=config.model,
        endpoint="chat" if config.dataset == "multi-turn" else config.endpoint,
        output_len=config.output_len,
        ignore_eos=config.ignore_eos,
        temperature=config.temperature,
        timeout=config.timeout,
        response_format=response_format(config),
    )


def response_format(config: BenchConfig) -> dict[str, Any] | None:
    if config.json_schema is not None:
        try:
            schema = json.loads(config.json_schema.read_text())
        except (OSError, ValueError) as e:
            raise BenchError(f"cannot read the JSON schema {config.json_schema}: {e}") from None
        name = re.sub(r"[^A-Za-z0-9_-]", "_", config.json_schema.stem)[:64] or "schema"  # the API's name rule
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    if config.response_format == "json_object":
        return {"type": "json_object"}
    return None


async def _calibrate(client: httpx.AsyncClient, config: BenchConfig) -> float | None:
    """Tokens per word of the random-prompt vocabulary, if the server can tokenize."""
    if config.dataset in PROMPT_SETS:
        return None
    assert config.model is not None
    count = await count_tokens(client, config.base_url, config.model, calibration_text(config.seed))
    return count / CALIBRATION_WORDS if count else None


def _prompt_batches(config: BenchConfig, tokens_per_word: float) -> list[list[Prompt]]:
    """Distinct prompts for the warm-up and for each run (so no run hits another's prefix cache)."""
    sizes = [config.warmup] + [config.num_prompts] * len(config.concurrencies)
    batch = config.batch_size if config.endpoint in ENCODER_ENDPOINTS else 1
    total = sum(sizes) * batch
    if config.dataset in PROMPT_SETS:
        pool = real_prompts(total, config.seed, config.dataset)
    else:  # multi-turn warms up with random prompts; its runs are conversations
        pool = random_prompts(total, config.input_len, config.input_len_spread, config.seed, tokens_per_word)
    if config.endpoint in ENCODER_ENDPOINTS:
        groups = [pool[i : i + batch] for i in range(0, total, batch)]
        pool = [Prompt(g[0].text, g[0].target_len, tuple(p.text for p in g)) for g in groups]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [pool[a:b] for a, b in itertools.pairwise(bounds)]


def _conversation_batches(config: BenchConfig, tokens_per_word: float) -> list[Work]:
    """Each run's conversations: one system prompt shared by all of a run's, none shared across runs."""
    return [
        make_conversations(
            config.num_prompts,
            config.turns,
            config.input_len,
            config.system_prompt_len,
            config.seed + 1000 * (i + 1),
            tokens_per_word,
        )
        for i in range(len(config.concurrencies))
    ]


async def _warm_up(client: httpx.AsyncClient, target: Target, prompts: list[Prompt], config: BenchConfig) -> None:
    if not prompts:
        return
    level = config.concurrencies[0] or len(prompts)
    records = await run_load(client, target, prompts, level, [0.0] * len(prompts))
    failed = [r for r in records if not r.is_ok]
    if failed:
        log.warning("%d of %d warm-up requests failed, e.g. %s", len(failed), len(records), failed[0].error)
