"""Prometheus metrics under vLLM's names (prefixed `tricklm:`), one registry per app."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from collections.abc import Callable

    from tricklm.engine.loop import EngineStats
    from tricklm.engine.output import OutputProcessor

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("tricklm:num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("tricklm:num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("tricklm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use", registry=r)
        self.step_failures = Gauge(
            "tricklm:engine_step_failures", "Engine steps that raised (the core restarted after each)", registry=r
        )
        self.prompt_tokens = Counter("tricklm:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("tricklm:generation_tokens", "Tokens generated", registry=r)
        self.success = Counter("tricklm:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.ttft = Histogram(
            "tricklm:time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "tricklm:inter_token_latency_seconds", "Gap between tokens", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "tricklm:e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        # Engine totals, counted as vLLM counts them: tokens looked up at admission, and found cached
        self.prefix_queries = Counter("tricklm:prefix_cache_queries", "Prefix-cache lookups, in tokens", registry=r)
        self.prefix_hits = Counter("tricklm:prefix_cache_hits", "Prefix-cache hits, in tokens", registry=r)
        self._counted = (0, 0)
        # Speculative decoding, under vLLM's names: drafts verified, their tokens, and those kept
        self.spec_drafts = Counter("tricklm:spec_decode_num_drafts", "Drafts verified", registry=r)
        self.spec_draft_tokens = Counter("tricklm:spec_decode_num_draft_tokens", "Draft tokens verified", registry=r)
        self.spec_accepted = Counter(
            "tricklm:spec_decode_num_accepted_tokens", "Draft tokens kept by verification", registry=r
        )
        self._spec_counted = (0, 0, 0)
        self._stats: Callable[[], EngineStats] | None = None

    def bind(self, stats: Callable[[], EngineStats]) -> None:
        """Where the engine's gauges and totals are read, at each scrape."""
        self._stats = stats

    def observe_finished(self, proc: OutputProcessor) -> None:
        t = proc.timings
        self.prompt_tokens.inc(proc.num_prompt_tokens)
        self.generation_tokens.inc(len(proc.token_ids))
        reason = proc.finish_reason or ("error" if proc.error else "abort")
        self.success.labels(finished_reason=reason).inc()
        if t.first_token is not None:
            self.ttft.observe(t.first_token - t.arrival)
        for a, b in zip(t.token_times, t.token_times[1:], strict=False):
            self.itl.observe(b - a)
        if t.last_token is not None:
            self.e2e.observe(t.last_token - t.arrival)

    def render(self) -> bytes:
        if self._stats is not None:
            stats = self._stats()
            self.running.set(stats.num_running)
            self.waiting.set(stats.num_waiting)
            self.kv_usage.set(stats.kv_cache_usage)
            self.step_failures.set(stats.num_step_failures)
            queries, hits = self._counted
            self.prefix_queries.inc(max(0, stats.prefix_cache_queries - queries))
            self.prefix_hits.inc(max(0, stats.prefix_cache_hits - hits))
            self._counted = (stats.prefix_cache_queries, stats.prefix_cache_hits)
            spec = (stats.spec_drafts, stats.spec_draft_tokens, stats.spec_accepted_tokens)
            for counter, now, then in zip(
                (self.spec_drafts, self.spec_draft_tokens, self.spec_accepted), spec, self._spec_counted, strict=True
            ):
                counter.inc(max(0, now - then))
            self._spec_counted = spec
        return generate_latest(self.registry)
