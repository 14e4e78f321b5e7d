"""`tricklm serve --replicas 2` on a local Ray: the same answers as one server, both replicas used,
conversations kept on their replica, metrics from both, disconnects cancelled, a killed replica survived."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI
from server_helpers import wait_until

from tricklm.config import EngineConfig
from tricklm.engine.engine import Engine
from tricklm.server.app import create_app
from tricklm.server.testing import free_port, running_server, wait_healthy

pytest.importorskip("ray.serve", reason="the replica tests need the ray extra (make installs it)")

REPLICA_PROCESS = "ServeReplica:tricklm:EngineReplica"
MODEL = "SmolLM2-135M-Instruct"
KEY = "replica-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of `tricklm serve --replicas 2` (1 CPU each), stopped by SIGTERM as a user would."""
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    # Small limits, so that the overload test can reach them: per replica 8 running + 8 waiting
    limits = ["--max-num-seqs", "8", "--max-queue", "8", "--api-key", KEY, "--allowed-origins", ORIGIN]
    cmd = [sys.executable, "-m", "tricklm", "serve", "--replicas", "2", "--cpus-per-replica", "1", *limits]
    out = open(log, "wb")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen([*cmd, "--port", str(port), "--stats-interval", "0"], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, 300, lambda: proc.poll() is None)
        wait_until(lambda: _live_replicas(base) == 2, 120, "both replicas")
        yield base
    except BaseException:
        print(log.read_text(errors="replace")[-5000:])
        raise
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        out.close()


@pytest.fixture(scope="module")
def one_server() -> Iterator[str]:
    """The default model on one plain server, on one thread as each replica runs: with other thread counts
    the sums round differently, and a sampled near-tie can flip."""
    engine = Engine(EngineConfig(num_threads=1), progress=False)
    try:
        with running_server(create_app(engine=engine)) as base:
            yield base
    finally:
        engine.shutdown()


def _live_replicas(base: str) -> int:
    r = httpx.get(base + "/health", timeout=10)
    return int(r.json().get("replicas", 0)) if r.status_code == 200 else 0


def _client(base: str) -> OpenAI:
    return OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat() -> dict[str, Any]:
    # The nonce first: no block of this prompt is in any prefix cache yet, on either side (a block computed
    # in another prompt's prefill can round differently, and flip a sampled near-tie)
    system = f"[{uuid.uuid4().hex}] You are a painter who answers in a sentence or two, plainly and warmly."
    question = "Name three colours, and say which of them you like best and why."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return {"messages": messages, "max_tokens": 24, "seed": 7}


def _reply(client: OpenAI, chat: dict[str, Any], stream: bool) -> str | None:
    if not stream:
        content: str | None = client.chat.completions.create(model=MODEL, **chat).choices[0].message.content
        return content
    chunks = client.chat.completions.create(model=MODEL, stream=True, **chat)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_answers_match_a_single_server_streamed_or_not(replicas: str, one_server: str) -> None:
    through_ray, direct = _client(replicas), _client(one_server)
    # Exact, not up to a near-tie: one numeric path on both sides (the same model and kernels on the same CPU, one
    # thread each, each request alone, its prompt computed or read from the cache alike), so the same logits and
    # the same seeded draws
    for stream in (False, True):
        chat = _chat()
        # Fresh on both sides, then again: from the prefix cache on both (the repeat goes to the same
        # replica, its prompt being long enough to route by)
        for _ in range(2):
            expected = _reply(direct, chat, stream=False)
            assert expected and _reply(through_ray, chat, stream) == expected, f"stream={stream}"


def test_streams_token_by_token_through_the_proxy(replicas: str) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "stream": True}
    arrivals: list[float] = []
    with httpx.stream("POST", replicas + "/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) >= 40
    # Buffered output would arrive in one burst (gaps of microseconds); streamed tokens arrive a step apart
    # (milliseconds). Counted rather than timed against the span: a busy machine may stall one step for
    # longer than the rest took, or hand the client several events in one read.
    apart = sum(b - a > 0.001 for a, b in itertools.pairwise(arrivals))
    assert apart >= 10, apart


def _conversation(base: str, i: int, served_by: list[tuple[int, str]]) -> None:
    try:
        _talk(base, i, served_by)
    except Exception as e:  # a thread's exception would only be printed; the test names it instead
        served_by.append((i, f"failed: {e!r}"))


def _talk(base: str, i: int, served_by: list[tuple[int, str]]) -> None:
    client = _client(base)
    # Long enough (> 128 characters) and distinct, so each conversation has a prefix of its own
    system = f"Conversation {i}. You are a patient assistant who answers in one short sentence. " * 3
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for turn in range(3):
        messages.append({"role": "user", "content": f"Question {turn}: what is {i} plus {turn}?"})
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=12,
            seed=i,
        )
        served_by.append((i, raw.headers["x-tricklm-replica"]))
        messages.append({"role": "assistant", "content": raw.parse().choices[0].message.content})


def test_both_replicas_take_traffic_and_conversations_stay_on_theirs(replicas: str) -> None:
    served_by: list[tuple[int, str]] = []
    threads = [threading.Thread(target=_conversation, args=(replicas, i, served_by)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(served_by) == 24 and not [r for _, r in served_by if r.startswith("failed")], served_by
    assert len({replica for _, replica in served_by}) == 2, "both replicas took conversations"
    for i in range(8):
        assert len({replica for conv, replica in served_by if conv == i}) == 1, f"conversation {i} moved"


def _series(base: str, name: str) -> dict[str, float]:
    """replica -> value of an unlabelled series in the endpoint's /metrics."""
    values: dict[str, float] = {}
    for line in httpx.get(base + "/metrics", headers=AUTH, timeout=10).text.splitlines():
        if line.startswith(name + "{replica="):
            replica = line.split('"')[1]
            values[replica] = values.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def test_metrics_show_every_replica_labelled(replicas: str) -> None:
    _client(replicas).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    time.sleep(1.5)  # replicas post their metrics each second
    running = _series(replicas, "tricklm:num_requests_running")
    assert len(running) == 2
    assert sum(_series(replicas, "tricklm:generation_tokens_total").values()) >= 2


def test_a_client_that_leaves_cancels_its_request_in_the_replica(replicas: str) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", replicas + "/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    # Replicas post their metrics each second: wait for a post that shows the abort
    wait_until(lambda: _aborted(replicas) >= 1, 20, "the abort in the replica's metrics")
    wait_until(lambda: sum(_series(replicas, "tricklm:num_requests_running").values()) == 0, 20, "a free batch")


def _aborted(base: str) -> float:
    lines = httpx.get(base + "/metrics", headers=AUTH, timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if 'finished_reason="abort"' in line)


def test_a_bad_request_gets_its_error_through_the_proxy(replicas: str) -> None:
    r = httpx.post(replicas + "/v1/chat/completions", json={"messages": "nope"}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(replicas + "/v1/completions", content=b"x" * (3 << 20), headers=AUTH, timeout=30)
    assert r.status_code == 413


def _status_of_long_stream(base: str, statuses: list[tuple[int, str | None, str]]) -> None:
    body = {"prompt": "Tell me a story.", "max_tokens": 150, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=AUTH, timeout=180) as r:
        last = [line for line in r.iter_lines() if line.strip()][-1]
        statuses.append((r.status_code, r.headers.get("retry-after"), last))


def test_past_every_queue_the_endpoint_answers_429_with_retry_after(replicas: str) -> None:
    statuses: list[tuple[int, str | None, str]] = []
    # Each replica admits 8 waiting (a burst has not started running yet) and refuses the rest itself
    threads = [threading.Thread(target=_status_of_long_stream, args=(replicas, statuses)) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    refused = [s for s in statuses if s[0] == 429]
    served = [s for s in statuses if s[0] == 200]
    assert len(statuses) == 40 and len(refused) + len(served) == 40, [s[0] for s in statuses]
    assert refused and all(retry == "1" for _, retry, _ in refused)
    assert len(served) >= 2 * 8 and all(last == "data: [DONE]" for _, _, last in served)


def test_the_application_builder_reads_serve_options() -> None:
    from tricklm.server.replicas import from_args

    app = from_args({"argv": "--replicas 3 --cpus-per-replica 2 --max-num-seqs 8 --max-queue 4"})
    gateway = app._bound_deployment
    engines = gateway.init_args[0]._bound_deployment
    assert (engines.num_replicas, engines.ray_actor_options["num_cpus"]) == (3, 2)
    assert (engines.max_ongoing_requests, engines.max_queued_requests) == (20, 36)
    assert engines.init_args[0].num_threads == 2, "each engine runs on the CPUs it reserved"
    assert gateway.ray_actor_options["num_cpus"] == 0


def _replica_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", REPLICA_PROCESS], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def _stream_result(base: str, results: list[str]) -> None:
    body = {"prompt": "Tell me a story.", "max_tokens": 60, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, headers=AUTH, timeout=120) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        if events[-1] != "data: [DONE]":
            results.append("cut")
        elif any('"error"' in e for e in events):
            results.append("error event")
        else:
            results.append("complete")
    except httpx.HTTPError as e:
        results.append(f"transport {type(e).__name__}")


def test_killing_a_replica_loses_nothing_that_had_not_started(replicas: str) -> None:
    pids = _replica_pids()
    assert len(pids) == 2
    in_flight: list[str] = []
    streams = [threading.Thread(target=_stream_result, args=(replicas, in_flight)) for _ in range(6)]
    for t in streams:
        t.start()
    time.sleep(1.0)
    os.kill(pids[0], signal.SIGKILL)
    after: list[str] = []
    later = [threading.Thread(target=_stream_result, args=(replicas, after)) for _ in range(6)]
    for t in later:
        t.start()
    for t in streams + later:
        t.join(timeout=180)
    # In flight on the killed replica: an error event then [DONE]; never a hang or a cut stream
    assert len(in_flight) == 6 and set(in_flight) <= {"complete", "error event"}, in_flight
    assert after == ["complete"] * 6, after
    assert _client(replicas).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    # Ray starts a replacement
    wait_until(lambda: _live_replicas(replicas) == 2 and len(_replica_pids()) == 2, 180, "the replacement replica")


def test_the_endpoint_serves_every_route(replicas: str) -> None:
    assert httpx.get(replicas + "/", headers=AUTH, timeout=10).status_code == 200
    assert httpx.get(replicas + "/static/app.js", headers=AUTH, timeout=10).status_code == 200
    assert httpx.get(replicas + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]
    r = httpx.post(replicas + "/generate", json={"prompt": "Hello", "max_tokens": 3}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["text"] is not None


def test_keys_and_cors_hold_through_the_gateway(replicas: str) -> None:
    r = httpx.get(replicas + "/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(replicas + "/metrics", timeout=10).status_code == 401
    assert httpx.get(replicas + "/health", timeout=10).status_code == 200
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    r = httpx.options(replicas + "/v1/chat/completions", headers=preflight, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN


# Refused before any model work, each by a different check: the gateway's body limit, the replica app's guard and
# validation. Each must reach the client byte for byte as one server writes it.
BAD_REQUESTS = [
    ("a body past the limit", "/v1/completions", b"x" * (3 << 20), "application/json"),
    ("not JSON", "/v1/completions", b'{"prompt": ', "application/json"),
    ("not JSON as its type", "/v1/chat/completions", b'{"messages": []}', "text/plain"),
    ("messages not a list", "/v1/chat/completions", b'{"messages": "nope"}', "application/json"),
    ("NaN", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', "application/json"),
    ("an unknown model", "/v1/completions", b'{"prompt": "hi", "model": "nope"}', "application/json"),
]


@pytest.mark.parametrize(
    ("path", "body", "kind"), [case[1:] for case in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_a_bad_request_gets_the_same_error_with_and_without_replicas(
    replicas: str, one_server: str, path: str, body: bytes, kind: str
) -> None:
    headers = {**AUTH, "content-type": kind}
    through_ray = httpx.post(replicas + path, content=body, headers=headers, timeout=30)
    alone = httpx.post(one_server + path, content=body, headers=headers, timeout=30)
    assert through_ray.status_code == alone.status_code >= 400
    assert through_ray.content == alone.content
