"""Thinking models through chat completions: reasoning apart from the answer, streamed or whole, with a
budget, template switches, structured outputs on the answer only, and the server's --reasoning-format."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_helpers import sse_payloads

from tiny_models import QWEN3_STYLE_TEMPLATE, R1_STYLE_TEMPLATE, make_thinking_model
from tricklm.config import EngineConfig, ServerConfig
from tricklm.engine.engine import Engine
from tricklm.server.app import create_app
from tricklm.server.testing import running_server

CHAT = [{"role": "user", "content": "Hello, how are you today?"}]
BASE = {"messages": CHAT, "temperature": 0, "ignore_eos": True}


def _engine(path: Any) -> Engine:
    return Engine(EngineConfig(model=str(path), max_num_seqs=4), progress=False)


@pytest.fixture(scope="module")
def r1_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = _engine(make_thinking_model(tmp_path_factory.mktemp("r1") / "m", R1_STYLE_TEMPLATE))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def r1(r1_engine: Engine) -> Iterator[str]:
    """A model whose template opens the thinking: every reply begins inside it."""
    with running_server(create_app(engine=r1_engine)) as base:
        yield base


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A model that opens its thinking itself, with Qwen3's `enable_thinking` switch."""
    engine = _engine(make_thinking_model(tmp_path_factory.mktemp("qwen3") / "m", QWEN3_STYLE_TEMPLATE))
    with running_server(create_app(ServerConfig(reasoning_budget=2), engine=engine)) as base:
        yield base
    engine.shutdown()


def chat(base: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{base}/v1/chat/completions", json={**BASE, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def streamed(base: str, **body: Any) -> tuple[str, str, dict[str, Any]]:
    """The streamed reply's reasoning and content, each concatenated, and its usage."""
    payload = {**BASE, **body, "stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(f"{base}/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    events = sse_payloads(r.content)
    deltas = [c["delta"] for e in events for c in e["choices"]]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    return reasoning, content, events[-1]["usage"]


def test_reasoning_comes_apart_from_the_answer_and_the_budget_closes_it(r1: str) -> None:
    whole = chat(r1, max_tokens=12, reasoning_budget=3)
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"]  # three tokens of thought (whitespace trimmed at its ends)
    assert "<think>" not in message["content"] and "</think>" not in message["content"]
    usage = whole["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 4  # three thoughts and the closing tag
    reasoning, content, stream_usage = streamed(r1, max_tokens=12, reasoning_budget=3)
    assert (reasoning, content) == (message["reasoning_content"], message["content"])
    assert stream_usage["completion_tokens_details"] == usage["completion_tokens_details"]


def test_without_a_budget_the_reply_may_think_to_its_end(r1: str) -> None:
    message = chat(r1, max_tokens=8)["choices"][0]["message"]
    reasoning, content, usage = streamed(r1, max_tokens=8)
    assert (reasoning, content) == (message["reasoning_content"] or "", message["content"])
    assert usage["completion_tokens_details"]["reasoning_tokens"] >= 1


def test_a_schema_constrains_the_answer_after_the_reasoning(r1: str) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"enum": ["x", "y"]}},
        "required": ["a"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}
    body = {"max_tokens": 40, "reasoning_budget": 4, "response_format": fmt, "ignore_eos": False}
    message = chat(r1, **body)["choices"][0]["message"]
    assert json.loads(message["content"])["a"] in ("x", "y")
    assert message["reasoning_content"]  # the reasoning was free text, not JSON


def test_reasoning_effort_none_turns_thinking_off_through_the_template(qwen3: str) -> None:
    off = chat(qwen3, max_tokens=6, reasoning_effort="none")
    assert off["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    assert "reasoning_content" not in off["choices"][0]["message"]  # the template closed the thinking
    kwargs_off = chat(qwen3, max_tokens=6, chat_template_kwargs={"enable_thinking": False})
    assert kwargs_off["choices"][0]["message"] == off["choices"][0]["message"]


def test_a_model_that_opens_its_thinking_itself_is_split_and_budgeted(qwen3: str) -> None:
    # The first token made `<think>` (vocabulary id 320), then the server's budget of 2 closes it
    whole = chat(qwen3, max_tokens=10, logit_bias={"320": 100})
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4  # tag, 2 thoughts, tag
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] == "<think><think>"  # the bias keeps writing the tag as text
    reasoning, content, _ = streamed(qwen3, max_tokens=10, logit_bias={"320": 100})
    assert (reasoning, content) == (message["reasoning_content"], message["content"])


def test_reasoning_format_none_leaves_the_reasoning_in_the_answer(r1_engine: Engine) -> None:
    with running_server(create_app(ServerConfig(reasoning_format="none"), engine=r1_engine)) as base:
        whole = chat(base, max_tokens=6)
    message = whole["choices"][0]["message"]
    assert "reasoning_content" not in message
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_include_reasoning_false_drops_it(r1: str) -> None:
    whole = chat(r1, max_tokens=8, reasoning_budget=2, include_reasoning=False)
    assert "reasoning_content" not in whole["choices"][0]["message"]
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"reasoning_budget": -1}, "reasoning_budget"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ],
)
def test_bad_reasoning_fields_are_400s_naming_them(r1: str, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{r1}/v1/chat/completions", json={**BASE, "max_tokens": 2, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
