"""Anthropic's Messages API through Anthropic's own client and raw events: replies, the exact event
sequence, stop sequences, tools, thinking blocks, count_tokens, its error shape and `x-api-key`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from server_helpers import WEATHER_DESCRIPTION, WEATHER_NAME, WEATHER_PARAMETERS

from tiny_models import R1_STYLE_TEMPLATE, make_thinking_model
from tricklm.config import EngineConfig, ServerConfig
from tricklm.engine.engine import Engine
from tricklm.model.resolve import DEFAULT_MODEL_NAME as MODEL
from tricklm.server.app import create_app
from tricklm.server.testing import running_server

HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]
WEATHER = {"name": WEATHER_NAME, "description": WEATHER_DESCRIPTION, "input_schema": WEATHER_PARAMETERS}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(default_server: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=default_server, api_key="x", max_retries=0, timeout=300) as c:
        yield c


def events(base: str, body: dict[str, Any], **headers: str) -> list[tuple[str, dict[str, Any]]]:
    """The stream's (event name, data) pairs, checked to name the same type twice."""
    r = httpx.post(f"{base}/v1/messages", json={**body, "stream": True}, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    out = []
    for raw in r.text.split("\n\n"):
        if not raw.strip():
            continue
        lines = dict(line.split(": ", 1) for line in raw.split("\n"))
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        out.append((lines["event"], data))
    return out


def test_a_reply_through_anthropics_client(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=12, messages=HELLO, extra_body=GREEDY)  # type: ignore[arg-type]
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert [b.type for b in message.content] == ["text"]
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens <= 12
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 10


def test_the_stream_is_anthropics_event_sequence_and_adds_up(client: anthropic.Anthropic, default_server: str) -> None:
    body = {"model": MODEL, "max_tokens": 12, "messages": HELLO, "temperature": 0, "system": "Be brief."}
    whole = httpx.post(f"{default_server}/v1/messages", json=body, timeout=120).json()
    sequence = events(default_server, body)
    names = [name for name, _ in sequence]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = sequence[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    text = "".join(d["delta"]["text"] for n, d in sequence if n == "content_block_delta")
    assert text == whole["content"][0]["text"]  # the prompt is cached by then: the same computation
    final = sequence[-2][1]
    assert final["delta"]["stop_reason"] == whole["stop_reason"]
    assert final["usage"]["output_tokens"] == whole["usage"]["output_tokens"]
    sdk = {k: v for k, v in body.items() if k != "temperature"}  # the client leaves sampling to extra_body
    with client.messages.stream(**sdk, extra_body=GREEDY) as stream:  # type: ignore[arg-type]
        assert "".join(stream.text_stream) == text
        assert stream.get_final_message().content[0].text == text  # type: ignore[union-attr]


def test_a_stop_sequence_ends_the_reply_and_is_named(client: anthropic.Anthropic) -> None:
    free = client.messages.create(model=MODEL, max_tokens=24, messages=HELLO, extra_body=GREEDY)  # type: ignore[arg-type]
    words = free.content[0].text.split()  # type: ignore[union-attr]
    stop = words[2]
    cut = client.messages.create(model=MODEL, max_tokens=24, messages=HELLO, extra_body=GREEDY, stop_sequences=[stop])  # type: ignore[arg-type]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert stop not in cut.content[0].text  # type: ignore[union-attr]


def test_a_forced_tool_use_streams_its_input_and_round_trips(client: anthropic.Anthropic) -> None:
    choice = {"type": "tool", "name": "get_weather"}
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 60,
        "messages": ASK_WEATHER,
        "tools": [WEATHER],
        "tool_choice": choice,
    }
    message = client.messages.create(**kwargs)
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")  # type: ignore[union-attr]
    jsonschema.validate(use.input, WEATHER["input_schema"])  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    jsonschema.validate(streamed[0].input, WEATHER["input_schema"])  # type: ignore[union-attr]
    # The result goes back as a tool_result block, and the conversation goes on
    history = [
        *ASK_WEATHER,
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},  # type: ignore[union-attr]
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C"}]},  # type: ignore[union-attr]
    ]
    after = client.messages.create(model=MODEL, max_tokens=8, messages=history, tools=[WEATHER])  # type: ignore[arg-type, list-item]
    assert after.content and after.usage.output_tokens >= 1


def test_any_asks_for_one_or_more_calls(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=80,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice={"type": "any"},  # type: ignore[arg-type, list-item]
    )
    uses = [b for b in message.content if b.type == "tool_use"]
    assert uses and message.stop_reason == "tool_use"
    for use in uses:
        jsonschema.validate(use.input, WEATHER["input_schema"])  # type: ignore[union-attr]


def test_count_tokens_counts_what_the_template_renders(default_server: str) -> None:
    body = {"model": MODEL, "system": "Be brief.", "messages": HELLO}
    counted = httpx.post(f"{default_server}/v1/messages/count_tokens", json=body, timeout=30)
    assert counted.status_code == 200, counted.text
    chat = [{"role": "system", "content": "Be brief."}, *HELLO]
    tokenized = httpx.post(f"{default_server}/tokenize", json={"messages": chat}, timeout=30).json()
    assert counted.json() == {"input_tokens": tokenized["count"]}


@pytest.mark.parametrize(
    ("body", "status", "kind", "words"),
    [
        ({"messages": HELLO}, 400, "invalid_request_error", "max_tokens"),
        ({"max_tokens": 4, "messages": HELLO, "temperature": 1.5}, 400, "invalid_request_error", "temperature"),
        ({"max_tokens": 4, "messages": []}, 400, "invalid_request_error", "messages"),
        (
            {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            400,
            "invalid_request_error",
            "'image'",
        ),
        (
            {"max_tokens": 4, "messages": HELLO, "tools": [{**WEATHER, "type": "web_search_20250305"}]},
            400,
            "invalid_request_error",
            "server tool",
        ),
        (
            {"max_tokens": 4, "messages": HELLO, "tool_choice": {"type": "any"}},
            400,
            "invalid_request_error",
            "no tools",
        ),
        ({"max_tokens": 4, "messages": HELLO, "model": "claude-nonexistent"}, 404, "not_found_error", "does not exist"),
    ],
)
def test_errors_have_anthropics_shape(
    default_server: str, body: dict[str, Any], status: int, kind: str, words: str
) -> None:
    r = httpx.post(f"{default_server}/v1/messages", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == kind
    assert words in error["error"]["message"]
    assert httpx.get(f"{default_server}/health", timeout=10).status_code == 200


def test_x_api_key_is_the_servers_key(tiny_engine: Engine) -> None:
    with running_server(create_app(ServerConfig(api_keys=("k-123",)), engine=tiny_engine)) as base:
        with anthropic.Anthropic(base_url=base, api_key="k-123", max_retries=0) as good:
            assert (
                good.messages.create(model=tiny_engine.info.model_name, max_tokens=2, messages=HELLO).content
                is not None
            )  # type: ignore[arg-type]
        r = httpx.post(f"{base}/v1/messages", json={"max_tokens": 2, "messages": HELLO}, headers={"x-api-key": "wrong"})
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = make_thinking_model(tmp_path_factory.mktemp("r1") / "m", R1_STYLE_TEMPLATE)
    engine = Engine(EngineConfig(model=str(path), max_num_seqs=2), progress=False)
    with running_server(create_app(engine=engine)) as base:
        yield base
    engine.shutdown()


def test_a_thinking_model_answers_with_a_thinking_block_first(thinker: str) -> None:
    body = {"max_tokens": 10, "messages": HELLO, "temperature": 0, "thinking": {"type": "enabled", "budget_tokens": 3}}
    whole = httpx.post(f"{thinker}/v1/messages", json=body, timeout=60).json()
    assert [b["type"] for b in whole["content"]][:1] == ["thinking"]
    sequence = events(thinker, body)
    starts = [d["content_block"]["type"] for n, d in sequence if n == "content_block_start"]
    assert starts[0] == "thinking"
    thought = "".join(d["delta"].get("thinking", "") for n, d in sequence if n == "content_block_delta")
    assert thought == whole["content"][0]["thinking"]
    off = httpx.post(f"{thinker}/v1/messages", json={**body, "thinking": {"type": "disabled"}}, timeout=60).json()
    assert "thinking" not in [b["type"] for b in off["content"]]
