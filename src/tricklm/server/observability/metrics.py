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
    """One registry for the app; every series carries `model_name` (vLLM's label), one value per model served."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        m = ("model_name",)
        self.running = Gauge("tricklm:num_requests_running", "Requests in the running batch", m, registry=r)
        self.waiting = Gauge("tricklm:num_requests_waiting", "Requests waiting to be scheduled", m, registry=r)
        self.kv_usage = Gauge("tricklm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use", m, registry=r)
        self.step_failures = Gauge(
            "tricklm:engine_step_failures", "Engine steps that raised (the core restarted after each)", m, registry=r
        )
        self.prompt_tokens = Counter("tricklm:prompt_tokens", "Prompt tokens processed", m, registry=r)
        self.generation_tokens = Counter("tricklm:generation_tokens", "Tokens generated", m, registry=r)
        self.success = Counter(
            "tricklm:request_success", "Finished requests", ("model_name", "finished_reason"), registry=r
        )
        self.ttft = Histogram(
            "tricklm:time_to_first_token_seconds", "Arrival to first token", m, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "tricklm:inter_token_latency_seconds", "Gap between tokens", m, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "tricklm:e2e_request_latency_seconds", "Arrival to last token", m, buckets=_LATENCY_BUCKETS, registry=r
        )
        # Engine totals, counted as vLLM counts them: tokens looked up at admission, and found cached
        self.prefix_queries = Counter("tricklm:prefix_cache_queries", "Prefix-cache lookups, in tokens", m, registry=r)
        self.prefix_hits = Counter("tricklm:prefix_cache_hits", "Prefix-cache hits, in tokens", m, registry=r)
        # Speculative decoding, under vLLM's names: drafts verified, their tokens, and those kept
        self.spec_drafts = Counter("tricklm:spec_decode_num_drafts", "Drafts verified", m, registry=r)
        self.spec_draft_tokens = Counter("tricklm:spec_decode_num_draft_tokens", "Draft tokens verified", m, registry=r)
        self.spec_accepted = Counter(
            "tricklm:spec_decode_num_accepted_tokens", "Draft tokens kept by verification", m, registry=r
        )
        self.encoder_inputs = Counter(
            "tricklm:encoder_inputs", "Texts embedded or (query, document) pairs scored", m, registry=r
        )
        self.encoder_tokens = Counter("tricklm:encoder_tokens", "Tokens read by encoder models", m, registry=r)
        self._engines: dict[str, EngineMetrics] = {}

    def for_engine(self, model_name: str, stats: Callable[[], EngineStats]) -> EngineMetrics:
        """A generating model's series, its gauges and totals read from `stats` at each scrape."""
        engine = EngineMetrics(self, model_name, stats)
        self._engines[model_name] = engine
        return engine

    def observe_encoder(self, model_name: str, inputs: int, tokens: int) -> None:
        self.encoder_inputs.labels(model_name).inc(inputs)
        self.encoder_tokens.labels(model_name).inc(tokens)

    def render(self) -> bytes:
        for engine in list(self._engines.values()):  # a model loading may add one meanwhile
            engine.scrape()
        return generate_latest(self.registry)


class EngineMetrics:
    """One generating model's series in the app's registry."""

    def __init__(self, metrics: Metrics, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self._m = metrics
        self.model_name = model_name
        self._stats = stats
        self._counted = (0, 0)
        self._spec_counted = (0, 0, 0)

    def observe_finished(self, proc: OutputProcessor) -> None:
        m, name, t = self._m, self.model_name, proc.timings
        m.prompt_tokens.labels(name).inc(proc.num_prompt_tokens)
        m.generation_tokens.labels(name).inc(len(proc.token_ids))
        reason = proc.finish_reason or ("error" if proc.error else "abort")
        m.success.labels(model_name=name, finished_reason=reason).inc()
        if t.first_token is not None:
            m.ttft.labels(name).observe(t.first_token - t.arrival)
        itl = m.itl.labels(name)
        for a, b in zip(t.token_times, t.token_times[1:], strict=False):
            itl.observe(b - a)
        if t.last_token is not None:
            m.e2e.labels(name).observe(t.last_token - t.arrival)

    def scrape(self) -> None:
        m, name, stats = self._m, self.model_name, self._stats()
        m.running.labels(name).set(stats.num_running)
        m.waiting.labels(name).set(stats.num_waiting)
        m.kv_usage.labels(name).set(stats.kv_cache_usage)
        m.step_failures.labels(name).set(stats.num_step_failures)
        queries, hits = self._counted
        m.prefix_queries.labels(name).inc(max(0, stats.prefix_cache_queries - queries))
        m.prefix_hits.labels(name).inc(max(0, stats.prefix_cache_hits - hits))
        self._counted = (stats.prefix_cache_queries, stats.prefix_cache_hits)
        spec = (stats.spec_drafts, stats.spec_draft_tokens, stats.spec_accepted_tokens)
        counters = (m.spec_drafts, m.spec_draft_tokens, m.spec_accepted)
        for counter, now, then in zip(counters, spec, self._spec_counted, strict=True):
            counter.labels(name).inc(max(0, now - then))
        self._spec_counted = spec
