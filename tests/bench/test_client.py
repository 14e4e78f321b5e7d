"""The streaming client against scripted responses (httpx.MockTransport): parsing, timing, every failure."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tricklm.bench.client import (
    BenchError,
    HealthProbe,
    Target,
    count_tokens,
    first_model_id,
    normalize_base_url,
    request_body,
    send_request,
    sse_data,
)
from tricklm.bench.metrics import RequestRecord

BASE = "http://bench.test"
Handler = Callable[[httpx.Request], Any]


def sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def text_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "object": "text_completion",
        "choices": [{"index": 0, "text": text, "finish_reason": finish}],
        "usage": None,
    }


def chat_chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}


def run(handler: Handler, target: Target | None = None, prompt: str = "hi") -> RequestRecord:
    async def go() -> RequestRecord:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send_request(client, target or Target(BASE, "m"), prompt, 0)

    return asyncio.run(go())


def streaming(body: bytes, status: int = 200) -> Handler:
    return lambda request: httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})


def test_completion_stream_with_usage() -> None:
    body = sse(text_chunk("Hel"), text_chunk(""), text_chunk("lo"), text_chunk("", "length"), USAGE, "[DONE]")
    r = run(streaming(body))
    assert r.is_ok, r.error
    assert len(r.chunk_times) == 2  # empty-text chunks are not content
    assert (r.output_tokens, r.prompt_tokens, r.finish_reason) == (5, 12, "length")
    assert r.start <= r.chunk_times[0] <= r.chunk_times[1] <= (r.end or 0)


def test_chat_stream_role_chunk_is_not_a_token_and_chunks_count_without_usage() -> None:
    body = sse(chat_chunk({"role": "assistant"}), chat_chunk({"content": "A"}), chat_chunk({"content": "B"}))
    r = run(streaming(body + sse(chat_chunk({}, "stop"), "[DONE]")), Target(BASE, "m", endpoint="chat"))
    assert r.is_ok
    assert (len(r.chunk_times), r.usage_output_tokens, r.output_tokens, r.finish_reason) == (2, None, 2, "stop")


def test_sse_comments_multiline_data_and_crlf() -> None:
    async def collect(lines: list[str]) -> list[str]:
        async def gen() -> Any:
            for line in lines:
                yield line

        return [d async for d in sse_data(gen())]

    lines = [": ping", "", "data: a", "data:b", "", "event: x", "data: [DONE]", ""]
    assert asyncio.run(collect(lines)) == ["a\nb", "[DONE]"]
    body = b": ping\r\n\r\n" + sse(text_chunk("x")).replace(b"\n", b"\r\n") + b"data: [DONE]\r\n\r\n"
    r = run(streaming(body))
    assert r.is_ok and len(r.chunk_times) == 1


def test_request_body_asks_for_usage_and_ignore_eos() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append({"path": request.url.path, **json.loads(request.content)})
        return httpx.Response(200, content=sse(text_chunk("x"), "[DONE]"))

    run(handler, Target(BASE, "m", output_len=7), "p")
    run(handler, Target(BASE, "m", endpoint="chat", ignore_eos=False), "q")
    assert seen[0]["path"] == "/v1/completions" and seen[0]["prompt"] == "p"
    assert seen[0]["max_tokens"] == 7 and seen[0]["ignore_eos"] is True and seen[0]["stream"] is True
    assert seen[0]["stream_options"] == {"include_usage": True}
    assert seen[1]["path"] == "/v1/chat/completions" and seen[1]["messages"] == [{"role": "user", "content": "q"}]
    assert "ignore_eos" not in seen[1] and "prompt" not in seen[1]
    assert request_body(Target(BASE, "m"), "x")["model"] == "m"


def test_http_error_status_is_a_failed_record() -> None:
    error = {"error": {"message": "Model is overloaded", "type": "RateLimitError", "code": 429}}
    r = run(lambda request: httpx.Response(429, json=error))
    assert (r.error_kind, r.error) == ("http_status", "HTTP 429: Model is overloaded")
    r = run(lambda request: httpx.Response(500, text="Internal Server Error"))
    assert (r.error_kind, r.error) == ("http_status", "HTTP 500: Internal Server Error")


def test_in_band_error_event_fails_the_request() -> None:
    error = {"error": {"message": "generation failed in the engine", "type": "server_error"}}
    r = run(streaming(sse(text_chunk("a"), error, "[DONE]")))
    assert (r.error_kind, r.error) == ("stream_error", "generation failed in the engine")


def test_missing_done_and_finish_reason_is_incomplete() -> None:
    r = run(streaming(sse(text_chunk("a"), text_chunk("b"))))
    assert r.error_kind == "incomplete"


def test_finished_stream_without_done_counts() -> None:
    """transformers serve ends complete streams without [DONE]; the finish_reason shows completion."""
    r = run(streaming(sse(text_chunk("a"), text_chunk("b", "length"))))
    assert r.is_ok and r.finish_reason == "length"


def test_bad_json_event() -> None:
    r = run(streaming(b"data: {not json\n\ndata: [DONE]\n\n"))
    assert r.error_kind == "bad_event"


def test_connection_error_and_timeout_are_failed_records() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    assert run(refuse).error_kind == "connection"

    async def stall(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, content=b"")

    r = run(stall, Target(BASE, "m", timeout=0.05))
    assert r.error_kind == "timeout"
    assert r.end is not None and r.end - r.start < 2


def test_normalize_base_url() -> None:
    assert normalize_base_url("http://h:1/v1/") == "http://h:1"
    assert normalize_base_url("http://h:1/") == "http://h:1"


def probe_for(handler: Handler, seconds: float) -> HealthProbe:
    async def go() -> HealthProbe:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            probe = HealthProbe(client, f"{BASE}/health", interval=0.05)
            task = asyncio.create_task(probe.run())
            await asyncio.sleep(seconds)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            probe.finish()
            return probe

    return asyncio.run(go())


def test_health_probe_samples_every_interval() -> None:
    probe = probe_for(lambda request: httpx.Response(200, json={"status": "ok"}), 0.32)
    assert probe.is_supported
    assert 3 <= len(probe.samples) <= 8
    assert all(s.is_ok and s.latency is not None for s in probe.samples)


def test_health_probe_stops_on_404() -> None:
    probe = probe_for(lambda request: httpx.Response(404), 0.2)
    assert not probe.is_supported and probe.samples == []


def test_health_probe_pending_at_the_end_is_failed() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200)

    probe = probe_for(hang, 0.1)
    assert len(probe.samples) == 1 and not probe.samples[0].is_ok
    assert probe.samples[0].error == "no answer before the run ended"


def test_stopped_health_probe_lets_the_probe_in_flight_finish() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.2)
        return httpx.Response(200)

    async def go() -> HealthProbe:
        async with httpx.AsyncClient(transport=httpx.MockTransport(slow)) as client:
            probe = HealthProbe(client, f"{BASE}/health", interval=0.05)
            task = asyncio.create_task(probe.run())
            await asyncio.sleep(0.05)  # the first probe is in flight
            probe.stop()
            await asyncio.wait_for(task, timeout=5)
            probe.finish()
            return probe

    probe = asyncio.run(go())
    assert len(probe.samples) == 1 and probe.samples[0].is_ok


def discovery(handler: Handler, fn: Callable[[httpx.AsyncClient], Any]) -> Any:
    async def go() -> Any:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await fn(client)

    return asyncio.run(go())


def test_first_model_id() -> None:
    models = {"object": "list", "data": [{"id": "a"}, {"id": "b"}]}
    assert discovery(lambda r: httpx.Response(200, json=models), lambda c: first_model_id(c, BASE)) == "a"
    with pytest.raises(BenchError, match="did not list any model"):
        discovery(lambda r: httpx.Response(200, json={"data": []}), lambda c: first_model_id(c, BASE))
    with pytest.raises(BenchError, match="cannot list models"):
        discovery(lambda r: httpx.Response(404), lambda c: first_model_id(c, BASE))


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(200, json={"count": 9, "tokens": [1] * 9}), 9),
        (httpx.Response(200, json={"tokens": [1, 2, 3]}), 3),
        (httpx.Response(404), None),
        (httpx.Response(200, text="nope"), None),
    ],
)
def test_count_tokens(response: httpx.Response, expected: int | None) -> None:
    assert discovery(lambda r: response, lambda c: count_tokens(c, BASE, "m", "a b c")) == expected
