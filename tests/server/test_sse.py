"""The one SSE encoder: exact bytes of every event, and the streaming response's headers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.testclient import TestClient

from tricklm.server.sse import DONE, SSE_HEADERS, SSEResponse, sse_event


def test_done_is_exact() -> None:
    assert DONE == b"data: [DONE]\n\n"


def test_simple_event_exact_bytes() -> None:
    assert sse_event({"token": "Hi", "token_id": 42}) == b'data: {"token": "Hi", "token_id": 42}\n\n'


def test_newlines_are_escaped_so_the_event_stays_one_line() -> None:
    event = sse_event({"token": "a\nb\r\nc\rd\n\n"})
    assert event == b'data: {"token": "a\\nb\\r\\nc\\rd\\n\\n"}\n\n'
    body = event[: -len(b"\n\n")]
    assert b"\n" not in body and b"\r" not in body
    assert event.count(b"\n\n") == 1 and event.endswith(b"\n\n")


def test_unicode_is_sent_as_utf8_not_escaped() -> None:
    text = "café 你好 😀 👨‍👩‍👧 \u2028"
    event = sse_event({"token": text})
    assert event == ('data: {"token": "' + text + '"}\n\n').encode("utf-8")
    assert json.loads(event.decode("utf-8")[len("data: ") :]) == {"token": text}


def test_nested_payload_round_trips() -> None:
    payload = {"id": "x", "choices": [{"index": 0, "delta": {"content": 'q"uote\\'}, "finish_reason": None}]}
    event = sse_event(payload)
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
    assert json.loads(event[len(b"data: ") : -2]) == payload


def test_sse_response_headers_and_body() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield sse_event({"n": 1})
        yield DONE

    app = FastAPI()

    @app.get("/s")
    async def stream() -> SSEResponse:
        return SSEResponse(body())

    with TestClient(app) as client:
        r = client.get("/s")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"
    assert SSE_HEADERS == {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    assert r.content == b'data: {"n": 1}\n\ndata: [DONE]\n\n'
