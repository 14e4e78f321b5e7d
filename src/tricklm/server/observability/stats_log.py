"""A periodic stats line, as vLLM prints one: requests running and waiting, KV-cache usage, and prompt and
generation throughput since the previous line, one line per generating model (named when there are several).
Idle periods log at DEBUG, so a quiet server stays quiet."""

from __future__ import annotations

import asyncio
import logging
import time

from tricklm.engine.loop import EngineStats
from tricklm.server.engine_client import EngineClient
from tricklm.server.state import ServerState

logger = logging.getLogger("tricklm.stats")


class StatsLogger:
    def __init__(self, state: ServerState, interval: float) -> None:
        self.state = state
        self.interval = interval
        self._models: dict[str, _ModelStats] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.log_once()

    def log_once(self) -> None:
        clients = self.state.clients()
        for client in clients:
            model = self._models.setdefault(client.served_name, _ModelStats())
            model.log(client, client.served_name if len(clients) > 1 else None)


class _ModelStats:
    def __init__(self) -> None:
        # Counting from zero, not from a first reading: tokens made before it (a request that finished
        # right after the model loaded) show in the first line instead of vanishing into a baseline
        self._last = EngineStats(0, 0, 0.0, 0, 0, 0, 0)
        self._last_time = time.monotonic()
        self._was_active = False

    def log(self, client: EngineClient, name: str | None) -> None:
        stats, now = client.stats(), time.monotonic()
        last, elapsed = self._last, max(now - self._last_time, 1e-9)
        self._last, self._last_time = stats, now
        fields = {
            "running": stats.num_running,
            "waiting": stats.num_waiting,
            "kv_cache_usage_pct": round(100 * stats.kv_cache_usage, 1),
            "prompt_tokens_per_s": round((stats.num_prompt_tokens - last.num_prompt_tokens) / elapsed, 1),
            "generation_tokens_per_s": round((stats.num_generation_tokens - last.num_generation_tokens) / elapsed, 1),
            "prefix_cache_hit_rate_pct": _rate(
                stats.prefix_cache_hits - last.prefix_cache_hits, stats.prefix_cache_queries - last.prefix_cache_queries
            ),
            "preemptions": stats.num_preemptions,
            "step_failures": stats.num_step_failures,
        }
        active = bool(fields["running"] or fields["waiting"] or fields["prompt_tokens_per_s"])
        active = active or bool(fields["generation_tokens_per_s"])
        # The first idle line after activity still shows, so the last figures read zero rather than stale
        level = logging.INFO if active or self._was_active else logging.DEBUG
        self._was_active = active
        text = (
            (f"{name}: " if name else "") + f"running: {fields['running']} reqs, waiting: {fields['waiting']} reqs, "
            f"KV cache usage: {fields['kv_cache_usage_pct']}%, prompt throughput: {fields['prompt_tokens_per_s']} "
            f"tokens/s, generation throughput: {fields['generation_tokens_per_s']} tokens/s, "
            f"prefix cache hit rate: {fields['prefix_cache_hit_rate_pct']}%"
        )
        logger.log(level, "%s", text, extra={"fields": fields})


def _rate(hits: int, queries: int) -> float:
    return round(100 * hits / queries, 1) if queries else 0.0
