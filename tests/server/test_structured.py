"""Structured outputs and tool calling through the official `openai` client, on the default model (issue 16)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field
from server_helpers import WEATHER_DESCRIPTION, WEATHER_NAME, WEATHER_PARAMETERS

from tricklm.engine.engine import Engine
from tricklm.engine.structured import GrammarCompiler
from tricklm.model.resolve import DEFAULT_MODEL_NAME as MODEL
from tricklm.server.sse import DONE

CHAT = [{"role": "user", "content": "Describe a person who lives in London as JSON."}]
Short = Field(max_length=24)


class Person(BaseModel):
    """Ten properties, as the issue's benchmark asks; strings bounded so a small model cannot ramble."""

    model_config = ConfigDict(extra="forbid")
    name: str = Short
    age: int = Field(ge=0, le=150)
    email: str = Short
    city: str = Short
    country: Literal["UK", "US", "FR", "DE"]
    score: float
    active: bool
    tags: list[Annotated[str, Field(max_length=16)]] = Field(max_length=3)
    manager: str | None = Short
    street: str = Short


WEATHER = {
    "type": "function",
    "function": {"name": WEATHER_NAME, "description": WEATHER_DESCRIPTION, "parameters": WEATHER_PARAMETERS},
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 20}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(default_server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{default_server}/v1", api_key="x", max_retries=0, timeout=300) as c:
        yield c


def _one_path(client: openai.OpenAI, kwargs: dict[str, Any]) -> None:
    """One token of the request first, so that the whole answer and the stream a test compares both find every full
    block of the prompt in the prefix cache and run alone: the same computation, so the same seeded draws, exactly.
    (Else the first call computes the prompt and the second reads it from the cache, in other kernels on some CPUs,
    and logprobs cannot show how near a boundary of the distribution a draw fell, where other logits change it.)"""
    client.chat.completions.create(**{**kwargs, "max_tokens": 1})


def _cached(usage: Any) -> int:
    return int(usage.prompt_tokens_details.cached_tokens)


WITH_USAGE = {"stream_options": {"include_usage": True}}  # a stream's cached tokens


def test_parse_returns_a_validated_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL, messages=CHAT, response_format=Person, max_tokens=300, temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    person = choice.message.parsed
    assert isinstance(person, Person)
    assert person.country in ("UK", "US", "FR", "DE") and len(person.tags) <= 3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sampled_json_validates_against_the_schema(client: openai.OpenAI, seed: int) -> None:
    schema = Person.model_json_schema()
    response = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=300,
        temperature=1.0,
        seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_json_object_mode_gives_an_object_with_bounded_whitespace(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL,
        prompt="A JSON object about a cat:",
        max_tokens=120,
        temperature=0.8,
        seed=7,
        extra_body={"response_format": {"type": "json_object"}},
    )
    choice = response.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.text), dict)
    assert "\n" not in choice.text and "  " not in choice.text  # no runs of whitespace to spin on


def test_a_cut_reply_says_length(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0, response_format={"type": "json_object"}
    )
    choice = response.choices[0]
    assert choice.finish_reason == "length" and (choice.message.content or "").startswith("{")


def test_streamed_json_equals_the_whole_answer(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": CHAT,
        "max_tokens": 200,
        "temperature": 0.9,
        "seed": 11,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}},
    }
    _one_path(client, kwargs)
    response = client.chat.completions.create(**kwargs)
    whole = response.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **WITH_USAGE, **kwargs))
    assert _cached(chunks[-1].usage) == _cached(response.usage) > 0  # the same depth
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole


def test_generate_takes_a_response_format(default_server: str) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    body = {
        "prompt": "2 + 2 =",
        "max_tokens": 30,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    }
    r = httpx.post(f"{default_server}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert set(json.loads(r.json()["text"])) == {"answer"}


def test_constrained_and_free_requests_share_a_batch(default_server: str, client: openai.OpenAI) -> None:
    free = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}
    alone = client.completions.create(**free).choices[0].text

    async def together() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=f"{default_server}/v1", api_key="x", max_retries=0) as c:
            constrained = [
                c.chat.completions.create(
                    model=MODEL,
                    messages=CHAT,
                    max_tokens=200,
                    temperature=0.7,
                    seed=i,
                    response_format={"type": "json_object"},
                )
                for i in range(3)
            ]
            return await asyncio.gather(c.completions.create(**free), *constrained)

    plain, *structured = asyncio.run(together())
    # The masks of its neighbours did not touch it (batching may move a late near-tie, not the answer)
    assert " Paris" in plain.choices[0].text and " Paris" in alone and not plain.choices[0].text.startswith("{")
    for r in structured:
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "object", "properties": {"a": {"type": "string", "format": "frog"}}}, "frog"),
        ({"type": "strnig"}, "strnig"),
        ({"type": "string", "pattern": "(("}, "unclosed group"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_it(
    client: openai.OpenAI, schema: dict[str, Any], says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}},
        )
    assert says in str(err.value) and err.value.body["param"].startswith("response_format")  # type: ignore[index]
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None


@pytest.mark.parametrize("parallel", [False, True])
def test_required_forces_calls_whose_arguments_validate(client: openai.OpenAI, parallel: bool) -> None:
    for seed in range(3):
        response = client.chat.completions.create(
            model=MODEL,
            messages=ASK_WEATHER,
            tools=[WEATHER, TIME],
            tool_choice="required",
            max_tokens=400,
            temperature=0.8,
            seed=seed,
            parallel_tool_calls=parallel,
        )
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice.message.content
        assert parallel or len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])  # type: ignore[index]


def test_a_named_function_is_called_and_streams_in_openai_shape(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK_WEATHER,
        "tools": [WEATHER, TIME],
        "max_tokens": 80,
        "temperature": 0.7,
        "seed": 3,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    _one_path(client, kwargs)
    response = client.chat.completions.create(**kwargs)
    whole = response.choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    assert whole.message.tool_calls and whole.message.tool_calls[0].function.name == "get_weather"
    every = list(client.chat.completions.create(stream=True, **WITH_USAGE, **kwargs))
    assert _cached(every[-1].usage) == _cached(response.usage) > 0  # the same depth
    chunks = [c for c in every if c.choices]
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    first = calls[0][0]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (
        0,
        "function",
        "get_weather",
        "",
    )
    assert first.id and first.id.startswith("call_")
    assert all(d[0].index == 0 and d[0].id is None for d in calls[1:])
    arguments = "".join(d[0].function.arguments or "" for d in calls[1:])
    assert arguments == whole.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_streamed_required_calls_equal_the_whole_answer(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK_WEATHER,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "max_tokens": 120,
        "temperature": 0.9,
        "seed": 5,
        "parallel_tool_calls": False,
    }
    _one_path(client, kwargs)
    response = client.chat.completions.create(**kwargs)
    whole = response.choices[0].message.tool_calls or []
    chunks = list(client.chat.completions.create(stream=True, **WITH_USAGE, **kwargs))
    assert _cached(chunks[-1].usage) == _cached(response.usage) > 0  # the same depth
    streamed: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = streamed.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert [streamed[i] for i in sorted(streamed)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole
    ]


def test_a_tool_round_trip(client: openai.OpenAI) -> None:
    first = (
        client.chat.completions.create(
            model=MODEL,
            messages=ASK_WEATHER,
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=80,
            temperature=0,
            parallel_tool_calls=False,
        )
        .choices[0]
        .message
    )
    assert first.tool_calls
    call = first.tool_calls[0]
    history: list[Any] = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], max_tokens=30, temperature=0
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    message = answer.choices[0].message
    assert message.content or message.tool_calls


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none", max_tokens=12, temperature=0
    )
    choice = response.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")


def test_raw_stream_ends_with_done_and_a_finish_reason(default_server: str) -> None:
    body = {
        "messages": ASK_WEATHER,
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
        "parallel_tool_calls": False,
    }
    r = httpx.post(f"{default_server}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.content.endswith(DONE)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_tokenizer_llguidance_cannot_read_gives_501_and_the_server_serves_on(
    default_engine: Engine, client: openai.OpenAI
) -> None:
    working = default_engine.grammars
    default_engine.grammars = GrammarCompiler(lambda: "{}", working._vocab_size, [0])
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=8, response_format={"type": "json_object"}
            )
    finally:
        default_engine.grammars = working
    assert e.value.status_code == 501
    assert e.value.body["code"] == "structured_outputs_unavailable"  # type: ignore[index]
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert plain.choices[0].message.content
