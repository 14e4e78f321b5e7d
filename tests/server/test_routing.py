"""The replica router's policy (prefix affinity, busy fallback) and the merged /metrics page, without Ray."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from tricklm.server.observability.metrics import Metrics
from tricklm.server.replicas.metrics_merge import merge_expositions
from tricklm.server.replicas.routing import (
    CHUNK_CHARS,
    MAX_KEY_CHARS,
    PrefixIndex,
    chunk_hashes,
    rank_replicas,
    routing_text,
)


def _chat(*contents: str) -> bytes:
    roles = ["system", "user", "assistant", "user", "assistant"]
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)]}).encode()


def test_a_conversations_next_turn_extends_the_text_of_the_last() -> None:
    system = "You answer questions about the weather in Lisbon, briefly. " * 4
    first = routing_text("/v1/chat/completions", _chat(system, "Is it raining?"))
    second = routing_text("/v1/chat/completions", _chat(system, "Is it raining?", "No.", "Tomorrow?"))
    assert system in first and second.startswith(first)
    one, two = chunk_hashes(first), chunk_hashes(second)
    assert len(one) == len(first) // CHUNK_CHARS and two[: len(one)] == one


def test_prompts_are_read_from_each_route_and_anything_else_routes_freely() -> None:
    assert routing_text("/v1/completions", json.dumps({"prompt": "abc"}).encode()) == "abc"
    assert routing_text("/v1/completions", json.dumps({"prompt": [1, 2]}).encode()) == "1,2,"
    assert routing_text("/generate", json.dumps({"prompt": "hi"}).encode()) == "hi"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}]}]}
    assert routing_text("/v1/chat/completions", json.dumps(parts).encode()).endswith("look")
    for path, body in [("/v1/completions", b"{not json"), ("/v1/completions", b"[1]"), ("/v1/models", b"{}")]:
        assert routing_text(path, body) == ""
    assert chunk_hashes("short") == []
    long_chat = _chat("You are terse. " * 10, "Summarise this. " + "word " * 40_000)
    assert len(long_chat) > 100_000 and len(routing_text("/v1/chat/completions", long_chat)) == MAX_KEY_CHARS


def test_the_replica_that_saw_the_prefix_ranks_first_unless_busy() -> None:
    index = PrefixIndex()
    shared = chunk_hashes("s" * (3 * CHUNK_CHARS))
    index.record(shared, "a")
    index.record(shared[:1], "b")
    depth = index.matches(shared, ["a", "b", "c"])
    assert depth == {"a": 3, "b": 1, "c": 0}
    assert rank_replicas(depth, {"a": 2, "b": 0, "c": 0}, busy_at=16) == [["a"], ["b", "c"]]
    # A full batch on "a": the next deepest free replica, then the rest
    assert rank_replicas(depth, {"a": 16, "b": 0, "c": 0}, busy_at=16) == [["b"], ["a", "c"]]
    # Nothing seen: every replica in one rank (the router takes the least loaded)
    assert rank_replicas({"a": 0, "b": 0}, {"a": None, "b": 3}, busy_at=16) == [["a", "b"]]


def test_the_index_forgets_dead_replicas_and_its_oldest_prefixes() -> None:
    index = PrefixIndex(capacity=4)
    first, second = chunk_hashes("x" * (4 * CHUNK_CHARS)), chunk_hashes("y" * (2 * CHUNK_CHARS))
    index.record(first, "a")
    index.record(second, "b")
    assert index.matches(first, ["a"]) == {"a": 0}, "the oldest chunks went first"
    assert index.matches(second, ["b"]) == {"b": 2}
    index.forget("b")
    assert index.matches(second, ["b"]) == {"b": 0}


def _page(tokens: int) -> str:
    metrics = Metrics()
    metrics.generation_tokens.labels("m").inc(tokens)
    metrics.success.labels(model_name="m", finished_reason="stop").inc()
    metrics.ttft.labels("m").observe(0.1)
    return metrics.render().decode()


def test_merged_metrics_parse_and_keep_every_replicas_samples_apart() -> None:
    page = merge_expositions([("r1", _page(5)), ("r2", _page(7))])
    families = {f.name: f for f in text_string_to_metric_families(page)}
    tokens = {
        s.labels["replica"]: s.value for s in families["tricklm:generation_tokens"].samples if s.name.endswith("_total")
    }
    assert tokens == {"r1": 5.0, "r2": 7.0}
    success = [s for s in families["tricklm:request_success"].samples if s.name.endswith("_total")]
    assert {(s.labels["replica"], s.labels["finished_reason"]) for s in success} == {("r1", "stop"), ("r2", "stop")}
    buckets = [s for s in families["tricklm:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")]
    assert {s.labels["replica"] for s in buckets} == {"r1", "r2"}
    assert page.count("# HELP tricklm:generation_tokens_total") == 1
    assert merge_expositions([]) == ""
