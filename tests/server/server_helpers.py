"""Shared helpers for the HTTP tests: strict SSE parsing and waiting for the engine to go idle."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from tricklm.engine.engine import Engine
from tricklm.tokenizer import Tokenizer

# One tool, as each API writes it: its name, description and JSON schema (the schema bounds the city so a small
# model cannot ramble)
WEATHER_NAME, WEATHER_DESCRIPTION = "get_weather", "The weather in a city"
WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}

_EVENT = re.compile(rb"data: ([^\r\n]*)\n\n")
DONE_EVENT = b"data: [DONE]\n\n"


def sse_payloads(raw: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of an SSE body, asserting exact framing: only `data: ...\\n\\n` events, `[DONE]` last."""
    events = []
    pos = 0
    while pos < len(raw):
        m = _EVENT.match(raw, pos)
        assert m is not None, f"bad SSE framing at byte {pos}: {raw[pos : pos + 80]!r}"
        events.append(m.group(0))
        pos = m.end()
    assert events, "empty SSE body"
    assert events[-1] == DONE_EVENT, events[-1]
    assert DONE_EVENT not in events[:-1], "[DONE] sent twice"
    payloads = []
    for event in events[:-1]:
        body = event[len(b"data: ") : -2]
        assert body.startswith(b"{") and body.endswith(b"}"), event
        payloads.append(json.loads(body))
    return payloads


def is_idle(engine: Engine) -> bool:
    stats = engine.loop.stats()
    kv = engine.core.kv_cache
    return bool(stats.num_running == 0 and stats.num_waiting == 0 and kv.num_free_blocks == kv.num_usable_blocks)


def wait_idle(engine: Engine, timeout: float) -> float:
    """Seconds until the engine holds no request and no KV block; fails after `timeout`."""
    start = time.monotonic()
    while not is_idle(engine):
        if time.monotonic() - start > timeout:
            stats = engine.loop.stats()
            kv = engine.core.kv_cache
            raise AssertionError(
                f"engine still busy after {timeout}s: {stats}, free blocks {kv.num_free_blocks}/{kv.num_usable_blocks}"
            )
        time.sleep(0.01)
    return time.monotonic() - start


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def clean_cut(tokenizer: Tokenizer, ids: list[int]) -> int:
    """The largest k such that ids[:k] decodes without a broken character."""
    return max(k for k in range(len(ids) + 1) if "\ufffd" not in tokenizer.decode(ids[:k]))


# Asked in Japanese: the answer stays Japanese whichever kernels compute it (asked in English, the int8 and the
# AMX kernels' near-ties gave Japanese and "Konnichiwa" in English)
JAPANESE_CHAT = [{"role": "user", "content": "日本語で自己紹介してください。"}]
