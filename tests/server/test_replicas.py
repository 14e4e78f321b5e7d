"""`tricklm serve --replicas 2` on a local Ray: the same answers as one server, both replicas used,
conversations kept on their replica, metrics from both, disconnects cancelled, a killed replica survived."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI
from server_helpers import wait_until

from tricklm.server.testing import free_port, wait_healthy

pytest.importorskip("ray.serve", reason="the replica tests need the ray extra (make installs it)")

REPLICA_PROCESS = "ServeReplica:tricklm:EngineReplica"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of `tricklm serve --replicas 2` (1 CPU each), stopped by SIGTERM as a user would."""
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    cmd = [sys.executable, "-m", "tricklm", "serve", "--replicas", "2", "--cpus-per-replica", "1"]
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


def _live_replicas(base: str) -> int:
    r = httpx.get(base + "/health", timeout=10)
    return int(r.json().get("replicas", 0)) if r.status_code == 200 else 0


def _client(base: str) -> OpenAI:
    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


CHAT = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 24, "seed": 7}


def test_answers_match_a_single_server_streamed_or_not(replicas: str, default_server: str) -> None:
    through_ray = _client(replicas)
    direct = _client(default_server)
    model = direct.models.list().data[0].id
    expected = direct.chat.completions.create(model=model, **CHAT).choices[0].message.content  # type: ignore[call-overload]
    got = through_ray.chat.completions.create(model=model, **CHAT).choices[0].message.content  # type: ignore[call-overload]
    stream = through_ray.chat.completions.create(model=model, stream=True, **CHAT)  # type: ignore[call-overload]
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert expected and got == expected
    assert streamed == expected


def test_streams_token_by_token_through_the_proxy(replicas: str) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "stream": True}
    arrivals: list[float] = []
    with httpx.stream("POST", replicas + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) >= 40
    # Buffered output would arrive in a burst at the end; tokens come over the generation's whole span
    assert arrivals[len(arrivals) // 2] - arrivals[0] > 0.25 * (arrivals[-1] - arrivals[0]) > 0


def _conversation(base: str, i: int, served_by: list[tuple[int, str]]) -> None:
    client = _client(base)
    # Long enough (> 128 characters) and distinct, so each conversation has a prefix of its own
    system = f"Conversation {i}. You are a patient assistant who answers in one short sentence. " * 3
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for turn in range(3):
        messages.append({"role": "user", "content": f"Question {turn}: what is {i} plus {turn}?"})
        raw = client.chat.completions.with_raw_response.create(
            model="SmolLM2-135M-Instruct",
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
    assert len(served_by) == 24, "every turn of every conversation was answered"
    assert len({replica for _, replica in served_by}) == 2, "both replicas took conversations"
    for i in range(8):
        assert len({replica for conv, replica in served_by if conv == i}) == 1, f"conversation {i} moved"


def _series(base: str, name: str) -> dict[str, float]:
    """replica -> value of an unlabelled series in the endpoint's /metrics."""
    values: dict[str, float] = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{replica="):
            replica = line.split('"')[1]
            values[replica] = values.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def test_metrics_show_every_replica_labelled(replicas: str) -> None:
    _client(replicas).completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2)
    time.sleep(1.5)  # replicas post their metrics each second
    running = _series(replicas, "tricklm:num_requests_running")
    assert len(running) == 2
    assert sum(_series(replicas, "tricklm:generation_tokens_total").values()) >= 2


def test_a_client_that_leaves_cancels_its_request_in_the_replica(replicas: str) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", replicas + "/v1/completions", json=body, timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    wait_until(lambda: sum(_series(replicas, "tricklm:num_requests_running").values()) == 0, 20, "the abort")
    aborted = [line for line in httpx.get(replicas + "/metrics").text.splitlines() if 'finished_reason="abort"' in line]
    assert any(float(line.rsplit(" ", 1)[1]) >= 1 for line in aborted)


def test_a_bad_request_gets_its_error_through_the_proxy(replicas: str) -> None:
    r = httpx.post(replicas + "/v1/chat/completions", json={"messages": "nope"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(replicas + "/v1/completions", content=b"x" * (3 << 20), timeout=30)
    assert r.status_code == 413


def _replica_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", REPLICA_PROCESS], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def _stream_result(base: str, results: list[str]) -> None:
    body = {"prompt": "Tell me a story.", "max_tokens": 60, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
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
    assert _client(replicas).completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2)
    # Ray starts a replacement
    wait_until(lambda: _live_replicas(replicas) == 2 and len(_replica_pids()) == 2, 180, "the replacement replica")


def test_the_endpoint_serves_every_route(replicas: str) -> None:
    assert httpx.get(replicas + "/", timeout=10).status_code == 200
    assert httpx.get(replicas + "/static/app.js", timeout=10).status_code == 200
    assert httpx.get(replicas + "/v1/models", timeout=10).json()["data"][0]["id"]
    r = httpx.post(replicas + "/generate", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["text"] is not None
