"""Metric arithmetic on synthetic timestamps."""

from __future__ import annotations

import numpy as np
import pytest

from tricklm.bench.metrics import (
    HealthSample,
    RequestRecord,
    e2el,
    itls,
    percentile,
    stats,
    summarize,
    tpot,
    ttft,
)


def record(
    chunks: list[float], end: float, usage: int | None = None, start: float = 10.0, index: int = 0
) -> RequestRecord:
    return RequestRecord(index=index, start=start, end=end, chunk_times=chunks, usage_output_tokens=usage)


def test_ttft_e2el_tpot_itl_from_usage() -> None:
    r = record([10.5, 10.7, 11.0], end=11.2, usage=5)
    assert ttft(r) == pytest.approx(0.5)
    assert e2el(r) == pytest.approx(1.2)
    assert tpot(r) == pytest.approx((1.2 - 0.5) / 4)  # tokens from usage, not chunks
    assert itls(r) == pytest.approx([0.2, 0.3])


def test_without_usage_tokens_are_counted_chunks() -> None:
    r = record([10.1, 10.2, 10.4], end=10.5)
    assert r.output_tokens == 3
    assert tpot(r) == pytest.approx((0.5 - 0.1) / 2)


def test_one_token_output_has_no_tpot_and_no_itl() -> None:
    r = record([10.3], end=10.31, usage=1)
    assert ttft(r) == pytest.approx(0.3)
    assert tpot(r) is None
    assert itls(r) == []


def test_no_content_has_no_ttft() -> None:
    r = record([], end=10.2, usage=0)
    assert ttft(r) is None
    assert tpot(r) is None
    assert e2el(r) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "values",
    [
        [1.0],
        [1.0, 2.0],
        [4.0, 1.0, 3.0, 2.0],
        [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8],
        list(np.random.default_rng(0).random(37)),
    ],
)
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_p99_of_small_lists_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([10.0, 20.0], 99) == pytest.approx(19.9)
    assert percentile([7.0], 99) == 7.0


def test_percentile_of_empty_is_none_and_q_is_checked() -> None:
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_stats_scale_and_empty() -> None:
    s = stats([0.001, 0.002, 0.003], 1000)
    assert s.count == 3
    assert [s.mean, s.p50, s.max] == pytest.approx([2.0, 2.0, 3.0])
    empty = stats([])
    assert empty.count == 0
    assert empty.mean is None and empty.p50 is None and empty.p99 is None and empty.max is None


def test_summary_counts_failures_and_uses_only_successes() -> None:
    ok1 = record([10.5, 10.7], end=11.0, usage=4, index=0)
    ok2 = record([10.2, 10.3], end=10.4, usage=2, index=1)
    ok2.prompt_tokens = ok1.prompt_tokens = 100
    bad = record([10.1], end=10.2, usage=None, index=2)
    bad.fail("connection", "RemoteProtocolError: peer closed connection")
    s = summarize([ok1, ok2, bad], duration_s=2.0)
    assert (s.completed, s.failed, s.errors) == (2, 1, {"connection": 1})
    assert s.total_output_tokens == 6 and s.total_input_tokens == 200
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(3.0)
    assert s.ttft_ms.count == 2 and s.ttft_ms.mean == pytest.approx(350.0)
    assert s.itl_ms.count == 2 and s.itl_ms.max == pytest.approx(200.0)
    assert s.tpot_ms.mean == pytest.approx(((0.5 / 3) + 0.2) / 2 * 1000)
    assert s.e2el_ms.p50 == pytest.approx(700.0)


def test_summary_of_nothing() -> None:
    s = summarize([], duration_s=0.0)
    assert (s.completed, s.failed, s.request_throughput, s.output_throughput) == (0, 0, 0.0, 0.0)
    assert s.ttft_ms.count == 0 and s.ttft_ms.p99 is None


def test_health_stats_use_answered_probes_only() -> None:
    health = [
        HealthSample(sent=0.0, latency=0.002, status=200),
        HealthSample(sent=0.1, latency=0.004, status=200),
        HealthSample(sent=0.2, latency=0.001, status=503),
        HealthSample(sent=0.3, error="no answer before the run ended"),
    ]
    s = summarize([], duration_s=1.0, health=health)
    assert (s.health_probes, s.health_failed) == (4, 2)
    assert s.health_ms.count == 2 and s.health_ms.mean == pytest.approx(3.0)
