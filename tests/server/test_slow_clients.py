"""Slow clients (slowloris) cannot hold connections: deadlines for a request's headers and its body."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tricklm.config import ServerConfig
from tricklm.engine.engine import Engine
from tricklm.server.app import create_app
from tricklm.server.middleware.slow_clients import header_deadline_protocol
from tricklm.server.testing import running_server

DEADLINE = 1.0


@pytest.fixture(scope="module")
def guarded(tiny_engine: Engine) -> Iterator[str]:
    app = create_app(ServerConfig(body_timeout=DEADLINE), engine=tiny_engine)
    with running_server(app, http=header_deadline_protocol(DEADLINE)) as base:
        yield base


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _trickle(sock: socket.socket, data: bytes, gap: float, limit: float) -> float:
    """Send `data` a byte every `gap` s until the server closes or `limit` s pass; return when it closed."""
    start = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        if time.monotonic() - start > limit:
            break
        time.sleep(gap)
    return time.monotonic() - start


def test_a_silent_connection_is_closed_at_the_header_deadline(guarded: str) -> None:
    with _connect(guarded) as sock:
        start = time.monotonic()
        answer = _read_until_closed(sock)
        took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 ") and DEADLINE * 0.9 <= took < DEADLINE + 3, took


def test_headers_sent_a_byte_at_a_time_meet_the_same_deadline(guarded: str) -> None:
    request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    with _connect(guarded) as sock:
        _trickle(sock, request, gap=0.1, limit=DEADLINE + 3)
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_trickled_body_gets_408_and_the_connection_closes(guarded: str) -> None:
    body = json.dumps({"prompt": "hi " * 100, "max_tokens": 2}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    with _connect(guarded) as sock:
        sock.sendall(head)
        sock.settimeout(DEADLINE + 5)
        _trickle(sock, body[:20], gap=0.1, limit=DEADLINE + 3)
        answer = _read_until_closed(sock)
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert b"connection: close" in rest.lower()
    error = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "timeout" and "did not arrive within 1 s" in error["message"]


def test_a_keep_alive_connection_serves_requests_after_the_first_deadline(guarded: str) -> None:
    with httpx.Client(base_url=guarded) as client:  # one pooled connection for both requests
        assert client.post("/tokenize", json={"prompt": "hi"}).status_code == 200
        time.sleep(DEADLINE * 1.5)  # idle between requests is keep-alive's business, not the header deadline's
        assert client.post("/tokenize", json={"prompt": "hi"}).status_code == 200
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_serve_uses_the_deadlines() -> None:
    from tricklm.options import build_parser, server_config

    args = build_parser().parse_args(["serve", "--header-timeout", "5", "--body-timeout", "7"])
    config = server_config(args)
    assert (config.header_timeout, config.body_timeout) == (5.0, 7.0)
    with pytest.raises(ValueError, match="header_timeout"):
        server_config(build_parser().parse_args(["serve", "--header-timeout", "0"]))
