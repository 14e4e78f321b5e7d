"""Thinking models through chat completions: reasoning apart from the answer, streamed or whole, with a
budget, template switches, structured outputs on the answer only, and the server's --reasoning-format."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_helpers import sse_payloads

from tiny_models import QWEN3_STYLE_TEMPLATE, R1_STYLE_TEMPLATE, make_thinking_model, real_template
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
        ({"chat_template_kwargs": {"strftime_now": 1}}, "chat_template_kwargs"),
        ({"reasoning_budget": -1}, "reasoning_budget"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ],
)
def test_bad_reasoning_fields_are_400s_naming_them(r1: str, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{r1}/v1/chat/completions", json={**BASE, "max_tokens": 2, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# ---- Qwen3's own chat template, on all three APIs ------------------------------------------------------

PICK = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"], "additionalProperties": False}
CHOOSE = {
    "type": "function",
    "function": {"name": "choose", "description": "Choose one", "parameters": PICK},
}


@pytest.fixture(scope="module")
def qwen3_real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Qwen3's published template; the model opens its thinking itself (as Qwen3 does), the server's
    budget of 3 closes it."""
    path = make_thinking_model(tmp_path_factory.mktemp("q3") / "m", real_template("Qwen-Qwen3-0.6B"), opens=True)
    engine = _engine(path)
    with running_server(create_app(ServerConfig(reasoning_budget=3), engine=engine)) as base:
        yield base
    engine.shutdown()


def test_qwen3s_template_chat_completions(qwen3_real: str) -> None:
    whole = chat(qwen3_real, max_tokens=10)
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5  # tag, 3 thoughts, tag
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"]
    reasoning, content, _ = streamed(qwen3_real, max_tokens=10)
    assert (reasoning, content) == (message["reasoning_content"], message["content"])
    off = chat(qwen3_real, max_tokens=4, chat_template_kwargs={"enable_thinking": False})
    assert off["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    assert "reasoning_content" not in off["choices"][0]["message"]


def test_qwen3s_template_json_and_required_calls_after_thinking(qwen3_real: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": PICK}}
    answer = chat(qwen3_real, max_tokens=30, response_format=fmt, ignore_eos=False)
    assert answer["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5
    assert json.loads(answer["choices"][0]["message"]["content"])["a"] in ("x", "y")
    called = chat(qwen3_real, max_tokens=120, tools=[CHOOSE], tool_choice="required", parallel_tool_calls=False)
    message = called["choices"][0]["message"]
    assert message["reasoning_content"] and called["choices"][0]["finish_reason"] == "tool_calls"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"])["a"] in ("x", "y")


def test_qwen3s_template_anthropic_messages(qwen3_real: str) -> None:
    body = {"max_tokens": 10, "messages": CHAT, "temperature": 0, "ignore_eos": True}
    whole = httpx.post(f"{qwen3_real}/v1/messages", json=body, timeout=60).json()
    kinds = [b["type"] for b in whole["content"]]
    assert kinds[0] == "thinking"
    r = httpx.post(f"{qwen3_real}/v1/messages", json={**body, "stream": True}, timeout=60)
    datas = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    thought = "".join(d["delta"].get("thinking", "") for d in datas if d["type"] == "content_block_delta")
    assert thought == whole["content"][0]["thinking"]
    off = httpx.post(f"{qwen3_real}/v1/messages", json={**body, "thinking": {"type": "disabled"}}, timeout=60).json()
    assert [b["type"] for b in off["content"]] == ["text"]


def test_qwen3s_template_responses(qwen3_real: str) -> None:
    body = {"input": "Hello", "max_output_tokens": 10, "temperature": 0, "ignore_eos": True, "store": False}
    whole = httpx.post(f"{qwen3_real}/v1/responses", json=body, timeout=60).json()
    assert [item["type"] for item in whole["output"]] == ["reasoning", "message"]
    assert whole["usage"]["output_tokens_details"]["reasoning_tokens"] == 5
    r = httpx.post(f"{qwen3_real}/v1/responses", json={**body, "stream": True}, timeout=60)
    datas = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    thought = "".join(d["delta"] for d in datas if d["type"] == "response.reasoning_text.delta")
    assert thought == whole["output"][0]["content"][0]["text"]
    off = httpx.post(f"{qwen3_real}/v1/responses", json={**body, "reasoning": {"effort": "none"}}, timeout=60).json()
    assert [item["type"] for item in off["output"]] == ["message"]


def test_the_next_turn_of_a_thinking_chat_finds_the_last_prompt_in_the_cache(qwen3_real: str) -> None:
    first = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6}]
    turn1 = chat(qwen3_real, messages=first, max_tokens=8)
    message = turn1["choices"][0]["message"]
    again = [*first, {"role": "assistant", **message}, {"role": "user", "content": "And then?"}]
    turn2 = chat(qwen3_real, messages=again, max_tokens=4)
    prompt1 = turn1["usage"]["prompt_tokens"]
    # the template drops the earlier reasoning, so the first prompt's full blocks are what can match
    assert turn2["usage"]["prompt_tokens_details"]["cached_tokens"] >= prompt1 // 16 * 16 > 0
