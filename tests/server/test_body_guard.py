"""The body guard's verdicts, case by case (the battery in test_hostile.py drives it over HTTP)."""

from __future__ import annotations

import json

import pytest

from tricklm.server.body_guard import MAX_DEPTH, check_body


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
