"""Benchmark metrics as `vllm bench serve` defines them, computed from per-request records.

Every time is a `time.perf_counter()` reading in seconds; summaries report milliseconds. Only successful
requests contribute latencies and tokens; failed ones are counted.

- TTFT: request sent → first chunk with non-empty text.
- TPOT: (E2EL − TTFT) / (output tokens − 1), per request; undefined for one-token outputs.
- ITL: gaps between consecutive content chunks (a chunk may carry several tokens), pooled over requests.
- E2EL: request sent → last byte received.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

_MS = 1000.0


@dataclass
class RequestRecord:
    """What happened to one request, filled in by the client as the stream arrives."""

    index: int
    start: float
    end: float | None = None  # last byte received
    chunk_times: list[float] = field(default_factory=list)  # arrivals of chunks with non-empty text
    usage_output_tokens: int | None = None  # `usage.completion_tokens`, when the server sent it
    prompt_tokens: int | None = None  # `usage.prompt_tokens`, when the server sent it
    cached_tokens: int | None = None  # `usage.prompt_tokens_details.cached_tokens`, when sent
    text: str = ""  # the answer (multi-turn conversations send it back)
    turn: int | None = None  # 1, 2, ... in a multi-turn conversation
    finish_reason: str | None = None
    inputs: int = 0  # texts embedded, or documents scored (embeddings and rerank requests)
    error_kind: str | None = None  # http_status | stream_error | connection | timeout | incomplete | ...
    error: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.error_kind is None

    @property
    def first_token(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def output_tokens(self) -> int:
        """Tokens from `usage` when present, else one per content chunk (a lower bound)."""
        return self.usage_output_tokens if self.usage_output_tokens is not None else len(self.chunk_times)

    def fail(self, kind: str, message: str) -> None:
        self.error_kind, self.error = kind, message


@dataclass
class HealthSample:
    """One probe of the health route: `latency` stays None when no answer came."""

    sent: float
    latency: float | None = None
    status: int | None = None
    error: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class Stats:
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


@dataclass(frozen=True)
class Summary:
    """One run's figures; latencies in milliseconds, throughputs per second of wall time."""

    completed: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_inputs: int  # texts embedded or documents scored (embeddings and rerank)
    input_throughput: float  # of those, a second
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2el_ms: Stats
    health_ms: Stats
    health_probes: int
    health_failed: int


# ---- per request ---------------------------------------------------------------------------------


def ttft(record: RequestRecord) -> float | None:
    first = record.first_token
    return None if first is None else first - record.start


def e2el(record: RequestRecord) -> float | None:
    return None if record.end is None else record.end - record.start


def tpot(record: RequestRecord) -> float | None:
    first, total = ttft(record), e2el(record)
    if first is None or total is None or record.output_tokens < 2:
        return None
    return (total - first) / (record.output_tokens - 1)


def itls(record: RequestRecord) -> list[float]:
    times = record.chunk_times
    return [b - a for a, b in itertools.pairwise(times)]


# ---- statistics ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """`numpy.percentile(values, q)` with the default 'linear' method; None for an empty sequence."""
    if not 0 <= q <= 100:
        raise ValueError("q must be between 0 and 100")
    if not values:
        return None
    xs = sorted(values)
    h = (len(xs) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def stats(values: Sequence[float], scale: float = 1.0) -> Stats:
    """Count, mean, p50/p90/p99 and max of `values` × `scale`; all None (count 0) when empty."""
    xs = [v * scale for v in values]
    if not xs:
        return Stats(0, None, None, None, None, None)
    pct = [percentile(xs, q) for q in (50, 90, 99)]
    return Stats(len(xs), math.fsum(xs) / len(xs), pct[0], pct[1], pct[2], max(xs))


def _defined(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]


# ---- one run -------------------------------------------------------------------------------------


def summarize(records: Sequence[RequestRecord], duration_s: float, health: Sequence[HealthSample] = ()) -> Summary:
    ok = [r for r in records if r.is_ok]
    output_tokens = sum(r.output_tokens for r in ok)
    answered = [h.latency for h in health if h.is_ok and h.latency is not None]
    return Summary(
        completed=len(ok),
        failed=len(records) - len(ok),
        errors=dict(Counter(r.error_kind for r in records if r.error_kind is not None)),
        duration_s=duration_s,
        total_input_tokens=sum(r.prompt_tokens or 0 for r in ok),
        total_output_tokens=output_tokens,
        request_throughput=_rate(len(ok), duration_s),
        output_throughput=_rate(output_tokens, duration_s),
        total_inputs=sum(r.inputs for r in ok),
        input_throughput=_rate(sum(r.inputs for r in ok), duration_s),
        ttft_ms=stats(_defined([ttft(r) for r in ok]), _MS),
        tpot_ms=stats(_defined([tpot(r) for r in ok]), _MS),
        itl_ms=stats([gap for r in ok for gap in itls(r)], _MS),
        e2el_ms=stats(_defined([e2el(r) for r in ok]), _MS),
        health_ms=stats(answered, _MS),
        health_probes=len(health),
        health_failed=sum(1 for h in health if not h.is_ok),
    )


def _rate(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0
