"""The body guard's verdicts, case by case (the battery in test_hostile.py drives it over HTTP)."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tricklm.server.middleware.body_guard import MAX_DEPTH, check_body


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b'{"temperature": NaN}', 400, "'temperature': NaN is not a finite number"),
        (b'{"a": [1, {"b": -Infinity}]}', 400, "'a.1.b': -Infinity"),
        (b'{"x": 1e400}', 400, "1e400 is not a finite number"),
        (b'{"prompt": "\\ud800"}', 400, "'prompt' contains a lone surrogate"),
        (b'{"m": [{"content": "ok \\udfff"}]}', 400, "'m.0.content' contains a lone surrogate"),
        (b'{"\\ud800": 1}', 400, "field name"),
        (b"\xff{}", 400, "not valid UTF-8"),
        (b"[" * 10_000 + b"]" * 10_000, 400, "nested"),
        (b'{"n": 1' + b"0" * 5000 + b"}", 400, "number that cannot be read"),
    ],
)
def test_bodies_that_would_break_a_handler_are_refused(body: bytes, status: int, words: str) -> None:
    error = check_body(body)
    assert error is not None and error.status_code == status
    assert words in error.message


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",  # not JSON: the route's own parser answers
        b'{"emoji": "\\ud83d\\ude00", "text": "caf\\u00e9"}',  # a surrogate pair is one valid character
        b'{"path": "C:\\\\ud800"}',  # an escaped backslash, then plain letters
        json.dumps({"prompt": list(range(1000)), "t": 0.7, "deep": [[[[1]]]]}).encode(),
    ],
)
def test_ordinary_bodies_pass(body: bytes) -> None:
    assert check_body(body) is None


def test_depth_is_checked_where_a_walk_runs() -> None:
    nested = "[" * (MAX_DEPTH + 5) + '"\\ud800"' + "]" * (MAX_DEPTH + 5)
    error = check_body(nested.encode())
    assert error is not None and "nested" in error.message


def _post_raw(base: str, size: int) -> bytes:
    """POSTs a body of `size` bytes over a plain socket, all of it, then reads the answer to its end."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {size}\r\n\r\n".encode())
        chunk = b"a" * 65536
        for start in range(0, size, len(chunk)):
            sock.sendall(chunk[: size - start])
        answer = b""
        while piece := sock.recv(65536):
            answer += piece
    return answer


@pytest.mark.parametrize("size", [10_000_000, 32 * 1024 * 1024])
def test_a_body_past_the_limit_gets_a_413_the_client_can_read(tiny_server: str, size: int) -> None:
    """Answering while the client still sends would reset the connection under it (it would see
    ConnectionResetError and no status): the rest is read and dropped first, then the answer closes it."""
    head, _, body = _post_raw(tiny_server, size).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "too_large"
    assert httpx.get(f"{tiny_server}/health").status_code == 200
