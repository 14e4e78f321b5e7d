"""OpenAI's Responses API through the official client: text, the typed event stream (which the client
checks item by item), function calls and their outputs, text.format, reasoning items, and refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field
from server_helpers import WEATHER_DESCRIPTION, WEATHER_NAME, WEATHER_PARAMETERS

from tiny_models import R1_STYLE_TEMPLATE, make_thinking_model
from tricklm.config import EngineConfig
from tricklm.engine.engine import Engine
from tricklm.model.resolve import DEFAULT_MODEL_NAME as MODEL
from tricklm.server.app import create_app
from tricklm.server.openai.response_store import ResponseStore
from tricklm.server.testing import running_server

WEATHER = {
    "type": "function",
    "name": WEATHER_NAME,
    "description": WEATHER_DESCRIPTION,
    "parameters": WEATHER_PARAMETERS,
}


@pytest.fixture(scope="module")
def client(default_server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{default_server}/v1", api_key="x", max_retries=0, timeout=300) as c:
        yield c


def test_text_in_text_out_whole_and_streamed(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "input": "Write one sentence about the sea.",
        "instructions": "Be brief.",
        "max_output_tokens": 12,
        "temperature": 0,
    }
    whole = client.responses.create(**kwargs)
    assert whole.object == "response" and whole.status in ("completed", "incomplete")
    assert [item.type for item in whole.output] == ["message"]
    assert whole.output_text and whole.usage is not None and whole.usage.output_tokens <= 12
    if whole.status == "incomplete":
        assert whole.incomplete_details is not None and whole.incomplete_details.reason == "max_output_tokens"
    with client.responses.stream(**kwargs) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == whole.output_text  # the prompt is cached by then: the same computation


def test_the_events_are_numbered_and_in_order(default_server: str) -> None:
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, "temperature": 0, "stream": True}
    r = httpx.post(f"{default_server}/v1/responses", json=body, timeout=60)
    assert r.status_code == 200 and "[DONE]" not in r.text
    sent = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in sent] == list(range(len(sent)))
    kinds = [e["type"] for e in sent]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert sent[-1]["response"]["output"][0]["content"][0]["text"] == sent[-3]["part"]["text"]


def test_a_forced_function_call_and_its_output_go_round(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    choice = {"type": "function", "name": "get_weather"}
    whole = client.responses.create(model=MODEL, input=ask, tools=[WEATHER], tool_choice=choice, max_output_tokens=60)  # type: ignore[arg-type]
    (call,) = [item for item in whole.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    with client.responses.stream(
        model=MODEL, input=ask, tools=[WEATHER], tool_choice=choice, max_output_tokens=60
    ) as s:  # type: ignore[arg-type]
        final = s.get_final_response()
    streamed = [item for item in final.output if item.type == "function_call"]
    jsonschema.validate(json.loads(streamed[0].arguments), WEATHER["parameters"])
    history = [
        *ask,
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
    ]
    after = client.responses.create(model=MODEL, input=history, tools=[WEATHER], max_output_tokens=8)  # type: ignore[arg-type]
    assert after.output


def test_required_calls_are_parsed_into_items(client: openai.OpenAI) -> None:
    ask = "What is the weather in Paris?"
    # one call at most: "one or more" lets a small model add calls until the token limit cuts the array
    kwargs: dict[str, Any] = {"model": MODEL, "input": ask, "tools": [WEATHER], "tool_choice": "required"}
    kwargs |= {"parallel_tool_calls": False, "max_output_tokens": 100}
    whole = client.responses.create(**kwargs)
    (call,) = [item for item in whole.output if item.type == "function_call"]
    assert call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    with client.responses.stream(**kwargs) as stream:
        final = stream.get_final_response()  # the client checks every item was added, filled and done
    assert [item.type for item in final.output] == ["function_call"]


def test_text_format_json_schema_constrains_the_answer(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    fmt = {"format": {"type": "json_schema", "name": "place", "schema": schema}}
    whole = client.responses.create(model=MODEL, input="Name a city as JSON.", text=fmt, max_output_tokens=40)  # type: ignore[arg-type]
    jsonschema.validate(json.loads(whole.output_text), schema)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, None),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
        ({"input": "hi", "tool_choice": "required"}, None),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, None),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}}, "text"),
    ],
)
def test_what_cannot_be_done_is_a_400(default_server: str, body: dict[str, Any], param: str | None) -> None:
    r = httpx.post(f"{default_server}/v1/responses", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)


def test_a_thinking_model_returns_a_reasoning_item_first(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = make_thinking_model(tmp_path_factory.mktemp("r1") / "m", R1_STYLE_TEMPLATE)
    engine = Engine(EngineConfig(model=str(path), max_num_seqs=2), progress=False)
    try:
        with running_server(create_app(engine=engine)) as base, openai.OpenAI(base_url=f"{base}/v1", api_key="x") as c:
            kwargs: dict[str, Any] = {
                "model": engine.info.model_name,
                "input": "Hello",
                "max_output_tokens": 8,
                "temperature": 0,
            }
            whole = c.responses.create(**kwargs, extra_body={"chat_template_kwargs": {}, "ignore_eos": True})
            assert whole.output[0].type == "reasoning"
            assert whole.usage is not None and whole.usage.output_tokens_details.reasoning_tokens >= 1
            with c.responses.stream(**kwargs) as stream:
                thought = "".join(e.delta for e in stream if e.type == "response.reasoning_text.delta")
            assert thought
            off = c.responses.create(**kwargs, reasoning={"effort": "none"})
            assert "reasoning" not in [item.type for item in off.output]
    finally:
        engine.shutdown()


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(model=MODEL, input="Name a city as JSON.", text_format=City, max_output_tokens=60)
    assert isinstance(parsed.output_parsed, City)


def test_a_stored_response_carries_the_conversation_and_can_be_read_and_deleted(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ana.", max_output_tokens=4, temperature=0)
    follow = client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=4, temperature=0
    )
    fresh = client.responses.create(
        model=MODEL, input="What is my name?", max_output_tokens=4, temperature=0, store=False
    )
    assert follow.previous_response_id == first.id
    assert follow.usage is not None and fresh.usage is not None and first.usage is not None
    # the stored turn (its input and its answer) precedes the new input, and its prefix is cached
    assert follow.usage.input_tokens > fresh.usage.input_tokens + first.usage.output_tokens
    assert follow.usage.input_tokens_details.cached_tokens > 0
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.create(model=MODEL, input="And now?", previous_response_id=first.id, max_output_tokens=2)
    assert "not found" in str(gone.value)
    with pytest.raises(openai.NotFoundError):  # store=False kept nothing
        client.responses.retrieve(fresh.id)


def test_the_store_is_bounded_by_count_and_bytes() -> None:
    store = ResponseStore(max_items=3, max_bytes=2_000)
    for k in range(5):
        store.put({"id": f"r{k}", "output": []}, [{"role": "user", "content": "x"}])
    with pytest.raises(Exception, match="not found"):
        store.get("r1")
    assert store.get("r4").body["id"] == "r4"
    store.put({"id": "big", "output": ["y" * 1_500]}, [])
    with pytest.raises(Exception, match="not found"):
        store.get("r2")  # evicted to make room for the big one
    store.put({"id": "huge", "output": ["z" * 5_000]}, [])  # larger than the whole store: kept nowhere
    with pytest.raises(Exception, match="not found"):
        store.get("huge")
