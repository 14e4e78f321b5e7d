"""API keys on every route but /health and the chat page, CORS closed by default, security headers."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from tricklm.config import ServerConfig
from tricklm.engine.engine import Engine
from tricklm.logs import JsonFormatter
from tricklm.server.app import create_app
from tricklm.server.middleware.access import is_loopback, read_keys
from tricklm.server.observability.stats_log import StatsLogger
from tricklm.server.state import ServerState
from tricklm.server.testing import free_port, running_server, wait_healthy

KEY, OTHER = "sk-test-0123456789", "sk-second-abcdefgh"
ORIGIN = "https://chat.example.org"
PROTECTED = [
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("GET", "/v1/models", None),
    ("POST", "/generate", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1, 2]}),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
]


@pytest.fixture(scope="module")
def keyed(tiny_engine: Engine) -> Iterator[str]:
    config = ServerConfig(api_keys=(KEY, OTHER), allowed_origins=(ORIGIN,))
    with running_server(create_app(config, engine=tiny_engine)) as base:
        yield base


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_every_route_but_health_and_the_page_needs_a_key(keyed: str, method: str, path: str, body: object) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": KEY}):
        r = httpx.request(method, keyed + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (path, headers)
        assert r.headers["www-authenticate"] == "Bearer"
        if path.startswith("/v1/"):
            assert r.json()["error"]["code"] == "invalid_api_key"
    for key in (KEY, OTHER):
        r = httpx.request(method, keyed + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200, (path, r.text[:200])


def test_health_and_the_page_stay_open(keyed: str) -> None:
    assert httpx.get(keyed + "/health").status_code == 200
    page = httpx.get(keyed + "/")
    assert page.status_code == 200 and "API key" in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


def test_the_openai_client_sends_its_key(keyed: str, tiny_engine: Engine) -> None:
    good = openai.OpenAI(base_url=keyed + "/v1", api_key=KEY)
    done = good.completions.create(model=tiny_engine.info.model_name, prompt="hi", max_tokens=2)
    assert done.choices[0].finish_reason == "length"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed + "/v1", api_key="not-the-key").models.list()


def test_a_key_is_never_logged(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A real `tricklm serve` at debug level, its whole output searched for the key and a wrong guess."""
    log = tmp_path / "server.log"
    with _server("--model", str(tiny_model_dir), "--api-key", KEY, "--log-level", "debug", log=log) as (_, base):
        assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer guess-1234567"}).status_code == 401
        assert httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    text = log.read_text(errors="replace")
    assert "GET /v1/models" in text  # the requests were logged, without their credentials
    assert KEY not in text and "guess-1234567" not in text


def test_metrics_can_be_opened_for_a_scraper(tiny_engine: Engine) -> None:
    with running_server(create_app(ServerConfig(api_keys=(KEY,), metrics_public=True), engine=tiny_engine)) as base:
        assert httpx.get(base + "/metrics").status_code == 200
        assert httpx.get(base + "/v1/models").status_code == 401


def test_cors_preflight_for_an_allowed_origin_is_answered_without_a_key(keyed: str) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    r = httpx.options(keyed + "/v1/chat/completions", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in r.headers  # keys are Bearer headers, never cookies
    # and the real request's answer, even a 401, carries the header the browser needs to read it
    r = httpx.get(keyed + "/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN


def test_cors_refuses_other_origins(keyed: str, tiny_server: str) -> None:
    evil = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(keyed + "/v1/chat/completions", headers=evil)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    # by default (no --allowed-origins) no response carries CORS headers at all: same-origin only
    for url in (tiny_server + "/v1/models", tiny_server + "/health"):
        assert "access-control-allow-origin" not in httpx.get(url, headers={"Origin": ORIGIN}).headers


def test_a_wildcard_origin_never_allows_credentials(tiny_engine: Engine) -> None:
    with running_server(create_app(ServerConfig(allowed_origins=("*",)), engine=tiny_engine)) as base:
        r = httpx.get(base + "/v1/models", headers={"Origin": "https://anywhere.example"})
        assert r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers


def test_keys_come_from_flags_a_file_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRICKLM_API_KEY", "from-the-env-1")
    file = tmp_path / "keys"
    file.write_text("# team keys\nfrom-a-file-1\n\nfrom-a-file-2\n")
    assert read_keys(["from-flag-1"], file) == ("from-flag-1", "from-a-file-1", "from-a-file-2", "from-the-env-1")
    for bad in ("short", "has a space", "caf\u00e9-latte-key"):  # too short; a space; not ASCII (no header carries it)
        with pytest.raises(ValueError, match="8 printable ASCII characters"):
            read_keys([bad], None)
    with pytest.raises(ValueError, match="--api-key-file"):
        read_keys([], tmp_path / "missing")


def test_loopback_hosts() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.10", "example.org"))


def test_serving_off_loopback_without_a_key_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The warning comes before the model loads; a bad model path then ends the process quickly."""
    monkeypatch.delenv("TRICKLM_API_KEY", raising=False)
    cmd = [sys.executable, "-m", "tricklm", "serve", "--host", "0.0.0.0", "--model", "/nonexistent/model"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "without an API key" in done.stderr and "no such model" in done.stderr


@contextmanager
def _server(*args: str, log: Path | None = None) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real `tricklm serve` (the default model unless `args` name another), killed whatever happens;
    its output goes to `log` (a pipe nobody reads could fill and stall it)."""
    port = free_port()
    out = open(log or os.devnull, "wb")  # noqa: SIM115 - closed below, after the process
    cmd = [sys.executable, "-m", "tricklm", "serve", "--port", str(port), "--max-num-seqs", "4", *args]
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, 120, lambda: proc.poll() is None)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        out.close()


def _stream(base: str, events: list[str], times: list[float] | None = None) -> None:
    """Stream a long completion into `events` (and when each arrived into `times`)."""
    body = {"prompt": "Once upon a time", "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if times is not None:
                    times.append(time.monotonic())


def test_sigterm_drains_for_the_timeout_then_ends_every_stream_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with _server("--shutdown-timeout", "2", log=log) as (proc, base):
        streams: list[list[str]] = [[] for _ in range(3)]
        times: list[list[float]] = [[] for _ in range(3)]
        threads = [
            threading.Thread(target=_stream, args=(base, e, t), daemon=True)
            for e, t in zip(streams, times, strict=True)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while min(len(e) for e in streams) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        at_signal = [len(e) for e in streams]
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        time.sleep(1.5)  # of the 2 s drain
        during = [len(e) for e in streams]
        assert all(d > n for d, n in zip(during, at_signal, strict=True)), f"streams stalled: {at_signal} -> {during}"
        for t in threads:
            t.join(timeout=30)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()[-2000:]
    for events, arrived in zip(streams, times, strict=True):
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["message"].endswith("the server is shutting down")
        ended = arrived[-2] - start  # the error event: when the drain's time was up, not before
        assert 1.8 <= ended <= 10, ended
    assert "Traceback" not in log.read_text()


def test_a_signal_while_the_model_loads_exits_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    port = free_port()
    with open(log, "wb") as out:
        cmd = [sys.executable, "-m", "tricklm", "serve", "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline, status = time.monotonic() + 120, None
            while status is None and proc.poll() is None and time.monotonic() < deadline:
                try:
                    status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code
                except httpx.TransportError:
                    time.sleep(0.02)
            assert status == 503, status  # up, and still loading (the load takes seconds)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    assert "stopped while the model was loading" in text and "terminate called" not in text


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with _server("--shutdown-timeout", "600", log=log) as (proc, base):
        events: list[str] = []
        reader = threading.Thread(target=_stream, args=(base, events), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while len(events) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # draining: the stream may take its 600 s
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        proc.wait(timeout=30)
        assert proc.returncode == 1 and time.monotonic() - start < 5
        reader.join(timeout=10)
    assert "second signal" in log.read_text()
    # the stream was not cut mid-way: it ended with an error event, then [DONE]
    assert events[-1] == "[DONE]", events[-3:]
    assert json.loads(events[-2])["error"]["message"] == "the server was stopped"


def test_a_request_past_the_timeout_ends_with_an_error_and_frees_its_slot(default_engine: Engine) -> None:
    with running_server(create_app(ServerConfig(request_timeout=1.0), engine=default_engine)) as base:
        events: list[str] = []
        start = time.monotonic()
        _stream(base, events)  # 4,000 tokens: far more than a second's worth
        took = time.monotonic() - start
        assert 1.0 <= took < 10, took
        assert events[-1] == "[DONE]" and len(events) > 3  # it streamed until the deadline
        assert "ran longer than 1 s" in json.loads(events[-2])["error"]["message"]
        whole = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 4000, "ignore_eos": True})
        assert whole.status_code == 504 and "ran longer than 1 s" in whole.json()["error"]["message"]
        assert whole.headers["x-should-retry"] == "false"  # the openai client would only time out again
        deadline = time.monotonic() + 10
        while default_engine.loop.stats().num_running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert default_engine.loop.stats().num_running == 0
        # and the next request is served
        short = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=30)
        assert short.status_code == 200


def test_one_access_line_per_request_with_its_id_and_no_text(
    tiny_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tricklm.access")
    secret_prompt = "the secret prompt words"
    with running_server(create_app(engine=tiny_engine)) as base:
        body = {"prompt": secret_prompt, "max_tokens": 5, "ignore_eos": True}
        r = httpx.post(base + "/v1/completions", json=body, headers={"X-Request-Id": "client-id-42"})
        assert r.headers["x-request-id"] == "client-id-42"
        streamed = httpx.post(
            base + "/v1/completions", json={**body, "stream": True}, headers={"X-Request-Id": "bad id"}
        )
        made = streamed.headers["x-request-id"]
        assert made != "bad id" and len(made) == 32  # not a sane id: one of ours instead
        assert httpx.get(base + "/v1/nothing-here").status_code == 404
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "tricklm.access"]
    ours = [line for line in lines if line.startswith("client-id-42 ")]
    assert len(ours) == 1
    assert "POST /v1/completions 200 prompt_tokens=" in ours[0] and "output_tokens=5 " in ours[0]
    assert "ttft=" in ours[0] and "ttft=-" not in ours[0]
    assert any(line.startswith(f"{made} POST /v1/completions 200") and "output_tokens=5 " in line for line in lines)
    assert any(" GET /v1/nothing-here 404 prompt_tokens=0 output_tokens=0 ttft=- " in line for line in lines)
    assert not any(secret_prompt in line for line in lines)


def test_log_requests_puts_the_texts_in_the_line(tiny_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tricklm.access")
    with running_server(create_app(ServerConfig(log_requests=True), engine=tiny_engine)) as base:
        body = {"prompt": "the visible prompt", "max_tokens": 3, "ignore_eos": True}
        text = httpx.post(base + "/v1/completions", json=body).json()["choices"][0]["text"]
    (record,) = [r for r in caplog.records if r.name == "tricklm.access" and "/v1/completions" in r.getMessage()]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["prompts"] == ["the visible prompt"] and fields["outputs"] == [text]
    assert 'prompts=["the visible prompt"]' in record.getMessage()


def test_json_logs_carry_the_fields_as_keys() -> None:
    record = logging.LogRecord("tricklm.access", logging.INFO, __file__, 1, "%s", ("a line",), None)
    record.fields = {"status": 200, "duration_ms": 12, "request_id": "r1"}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "a line" and entry["status"] == 200 and entry["request_id"] == "r1"
    assert entry["level"] == "INFO" and entry["time"].endswith("Z")


def _wait_until_idle(engine: Engine, timeout: float = 30.0) -> None:
    """Until the engine runs nothing and its token counters stand still between two reads a step apart."""
    deadline = time.monotonic() + timeout
    before = engine.loop.stats()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = engine.loop.stats()
        counts = (now.num_prompt_tokens, now.num_generation_tokens)
        if (
            not now.num_running
            and not now.num_waiting
            and counts == (before.num_prompt_tokens, before.num_generation_tokens)
        ):
            return
        before = now
    raise AssertionError("the shared engine did not go idle")


def test_the_stats_line_reports_throughput_then_goes_quiet(
    tiny_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tricklm.stats")
    state = ServerState()
    state.add(tiny_engine)
    stats = StatsLogger(state, interval=1.0)
    _wait_until_idle(tiny_engine)  # the shared engine may still be finishing an earlier test's request
    stats.log_once()  # whatever the shared engine did before, counted from zero
    with running_server(create_app(engine=tiny_engine)) as base:
        httpx.post(base + "/v1/completions", json={"prompt": "a b c", "max_tokens": 8, "ignore_eos": True})
    _wait_until_idle(tiny_engine)
    stats.log_once()
    stats.log_once()
    stats.log_once()
    # the last three are this logger's (the app's own stats task may have logged while the server ran)
    busy, first_idle, idle = [r for r in caplog.records if r.name == "tricklm.stats"][-3:]
    assert busy.levelno == logging.INFO and busy.fields["generation_tokens_per_s"] > 0  # type: ignore[attr-defined]
    assert "generation throughput" in busy.getMessage() and "KV cache usage" in busy.getMessage()
    assert first_idle.levelno == logging.INFO and first_idle.fields["generation_tokens_per_s"] == 0  # type: ignore[attr-defined]
    assert idle.levelno == logging.DEBUG


def test_serve_logs_json_lines_with_access_and_stats(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with _server("--log-format", "json", "--stats-interval", "0.5", log=log) as (_, base):
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
        time.sleep(1.5)
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert entries and len(entries) == len(log.read_text().splitlines())  # nothing but JSON, uvicorn's too
    access = [e for e in entries if e["logger"] == "tricklm.access"]
    assert [(e["path"], e["status"]) for e in access] == [("/v1/completions", 200)]
    assert access[0]["output_tokens"] == 4 and "prompts" not in access[0]
    assert any(e["logger"] == "tricklm.stats" and e["generation_tokens_per_s"] > 0 for e in entries)


def test_a_path_cannot_forge_a_log_line(tiny_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tricklm.access")
    with running_server(create_app(engine=tiny_engine)) as base:
        assert httpx.get(base + "/x%0d%0aINFO tricklm.access: forged").status_code == 404
    (line,) = [r.getMessage() for r in caplog.records if r.name == "tricklm.access" and "forged" in r.getMessage()]
    assert "\n" not in line and "\r" not in line and "/x%0D%0AINFO%20tricklm.access:%20forged 404" in line
