"""The OpenAI-compatible API driven by the official `openai` client (sync and async) and raw HTTP (issue 3)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_helpers import clean_cut, sse_payloads, wait_idle

from agreement import (
    FLOAT_MARGIN,
    INT8_MARGIN,
    Agreement,
    Steps,
    chat_steps,
    check_answers,
    check_texts,
    completion_steps,
)
from tricklm.config import EngineConfig
from tricklm.engine.engine import Engine
from tricklm.model.resolve import DEFAULT_MODEL_NAME
from tricklm.server.app import create_app
from tricklm.server.testing import running_server

FRANCE = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TINY_CHAT = [{"role": "user", "content": "Hello, world! How are you today?"}]
TINY_PROMPT = "The quick brown fox"
# A count, shown how once: on the default model every one of the first dozen steps has a top-2 margin well above
# INT8_MARGIN (asked the capital of France, the first step is a near-tie), so two paths are compared to the end
COUNT_CHAT = [
    {"role": "user", "content": "Count from 1 to 5."},
    {"role": "assistant", "content": "1, 2, 3, 4, 5"},
    {"role": "user", "content": "Count from 1 to 10."},
]
# A Japanese word to repeat, shown how once: its first 11 steps' margins as wide (asked to introduce itself, the
# first steps are near-ties), and most of its characters split across byte-level tokens
JAPANESE_REPEAT = [
    {"role": "user", "content": "Repeat: hello"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "Repeat: ありがとうございます"},
]
TOP2: dict[str, Any] = {"logprobs": True, "top_logprobs": 2}  # chat: each step's top-2 margin


@pytest.fixture(scope="module")
def client(default_server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{default_server}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tiny(tiny_server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tiny_name(tiny_engine: Engine) -> str:
    return tiny_engine.info.model_name


@pytest.fixture(scope="module")
def float_tiny(tiny_model_dir: Path) -> Iterator[tuple[str, str]]:
    """(base URL, model name) of the tiny Llama in float32, where batched and alone differ only in summation
    order. The default int4 mode reads a bfloat16 copy of the weights in wide steps (where the CPU runs that
    faster) and packed fp16 in narrow ones, and that moves this random model's logits by more than many of its
    top-2 margins."""
    engine = Engine(EngineConfig(model=str(tiny_model_dir), quantization="none", max_num_seqs=8), progress=False)
    try:
        with running_server(create_app(engine=engine)) as base:
            yield base, engine.info.model_name
    finally:
        engine.shutdown()


def _raw_stream(base: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST with stream true and return the chunks, after checking the exact SSE framing and headers."""
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        return sse_payloads(b"".join(r.iter_raw()))


def _chat_text(chunks: list[Any], index: int = 0) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)


def _text(chunks: list[Any], index: int = 0) -> str:
    return "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == index)


def _chat_steps(chunks: list[Any]) -> Steps:
    return chat_steps(*(c.choices[0].logprobs for c in chunks if c.choices))


def _completion_steps(chunks: list[Any]) -> Steps:
    return completion_steps(*(c.choices[0].logprobs for c in chunks if c.choices))


# ---- streamed == non-streamed ------------------------------------------------------------------------


def test_chat_streamed_equals_non_streamed(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": DEFAULT_MODEL_NAME, "messages": COUNT_CHAT, "max_tokens": 12, "temperature": 0}
    full = client.chat.completions.create(**kw, **TOP2)
    text = full.choices[0].message.content
    assert text and len(text) > 10
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(stream=True, **kw, **TOP2))
    # The stream finds more of the prompt in the prefix cache than the first call did, and computes the rest in
    # other kernels on some CPUs: the two agree up to a near-tie
    agreement = Agreement(INT8_MARGIN)
    whole = (text, chat_steps(full.choices[0].logprobs))
    if check_texts(agreement, (_chat_text(chunks), _chat_steps(chunks)), whole, what="chat"):
        assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    agreement.assert_meaningful(0.75)


def test_completions_streamed_equals_non_streamed(client: openai.OpenAI) -> None:
    full = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=FRANCE, max_tokens=10, temperature=0)
    assert full.object == "text_completion" and "Paris" in full.choices[0].text
    chunks = list(
        client.completions.create(model=DEFAULT_MODEL_NAME, prompt=FRANCE, max_tokens=10, temperature=0, stream=True)
    )
    assert _text(chunks) == full.choices[0].text


def test_async_client_streams_concurrently_and_match(float_tiny: tuple[str, str]) -> None:
    """Several requests at once (batched by the engine) give the same greedy text as one at a time."""
    base, name = float_tiny
    prompts = ["The sun rises", "Once upon a time", "Cats and dogs", "Hello, world!"]

    async def run() -> tuple[list[tuple[str, Steps]], list[tuple[str, Steps]], list[tuple[str, Steps]]]:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as c:
            kw: dict[str, Any] = {"model": name, "max_tokens": 12, "temperature": 0, "logprobs": 5}
            kw["extra_body"] = {"ignore_eos": True}

            async def whole(p: str) -> tuple[str, Steps]:
                choice = (await c.completions.create(prompt=p, **kw)).choices[0]
                return choice.text, completion_steps(choice.logprobs)

            async def streamed(p: str) -> tuple[str, Steps]:
                chunks = [chunk async for chunk in await c.completions.create(prompt=p, stream=True, **kw)]
                return _text(chunks), _completion_steps(chunks)

            alone = [await whole(p) for p in prompts]
            together = await asyncio.gather(*(whole(p) for p in prompts))
            streams = await asyncio.gather(*(streamed(p) for p in prompts))
            return alone, list(together), list(streams)

    alone, together, streams = asyncio.run(run())
    # Batched, the float32 matmuls sum in another order than alone
    agreement = Agreement(FLOAT_MARGIN)
    for i, want in enumerate(alone):
        check_texts(agreement, together[i], want, what=f"together {i}")
        check_texts(agreement, streams[i], want, what=f"streamed {i}")
    agreement.assert_meaningful(0.75)


def test_async_chat_stream_equals_non_streamed(client: openai.OpenAI, default_server: str) -> None:
    async def run() -> tuple[Any, list[Any]]:
        async with openai.AsyncOpenAI(base_url=f"{default_server}/v1", api_key="x", max_retries=0) as c:
            kw: dict[str, Any] = {"model": DEFAULT_MODEL_NAME, "messages": COUNT_CHAT, "max_tokens": 8, **TOP2}
            full = await c.chat.completions.create(temperature=0, **kw)
            chunks = [chunk async for chunk in await c.chat.completions.create(temperature=0, stream=True, **kw)]
            return full, chunks

    full, chunks = asyncio.run(run())
    text = full.choices[0].message.content or ""
    assert text
    # The stream finds more of the prompt in the prefix cache than the first call did: up to a near-tie
    agreement = Agreement(INT8_MARGIN)
    whole = (text, chat_steps(full.choices[0].logprobs))
    check_texts(agreement, (_chat_text(chunks), _chat_steps(chunks)), whole, what="async chat")
    agreement.assert_meaningful(0.75)


def test_multibyte_continuation_in_chat_stream(
    client: openai.OpenAI, default_server: str, default_engine: Engine
) -> None:
    tok = default_engine.tokenizer
    templated = tok.apply_chat_template(JAPANESE_REPEAT)
    assert tok.encode(templated) == tok.encode(templated, add_special_tokens=False)  # /generate sees the same ids
    body = {"prompt": templated, "max_tokens": 11, "temperature": 0}
    ids = httpx.post(f"{default_server}/generate", json=body, timeout=60).json()["token_ids"]
    k = clean_cut(tok, ids)
    expected = tok.decode(ids[:k])
    assert k >= 6 and sum(ord(c) > 0x3000 for c in expected) >= 3, (k, expected)  # guard: really multi-byte

    kw: dict[str, Any] = {"model": DEFAULT_MODEL_NAME, "messages": JAPANESE_REPEAT, "max_tokens": k, "temperature": 0}
    full = client.chat.completions.create(**kw, **TOP2)
    chunks = list(client.chat.completions.create(stream=True, **kw, **TOP2))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert all("\ufffd" not in piece for piece in contents), contents
    assert len(contents) < k  # pieces of one character arrive together, not as one chunk per token
    # /generate computed the prompt, the chat calls find it in the prefix cache: up to a near-tie. Where the chat
    # calls' margins are past the bound (twice what a path moves them), /generate cannot have chosen otherwise.
    agreement = Agreement(INT8_MARGIN)
    whole = (full.choices[0].message.content or "", chat_steps(full.choices[0].logprobs))
    if check_texts(agreement, ("".join(contents), _chat_steps(chunks)), whole, what="multibyte"):
        assert whole[0] == expected
    agreement.assert_meaningful(0.75)


# ---- usage ---------------------------------------------------------------------------------------------


def test_chat_usage_counts_are_exact(client: openai.OpenAI, default_server: str, default_engine: Engine) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
    ]
    tokenized = httpx.post(f"{default_server}/tokenize", json={"messages": messages}).json()
    tok = default_engine.tokenizer
    flat = [messages[0], {"role": "user", "content": "Name a color."}]
    independent = tok.encode(tok.apply_chat_template(flat, add_generation_prompt=True), add_special_tokens=False)
    assert tokenized["tokens"] == independent and tokenized["count"] == len(independent)
    bos_id = tok.encode(tok.bos_token or "", add_special_tokens=False)[0]
    assert independent[0] == bos_id and independent[1] != bos_id  # the template's BOS, not doubled

    kw: dict[str, Any] = {"model": DEFAULT_MODEL_NAME, "messages": messages, "max_tokens": 5, "temperature": 0}
    full = client.chat.completions.create(extra_body={"ignore_eos": True}, **kw)
    assert full.usage is not None
    assert full.usage.prompt_tokens == len(independent)
    assert full.usage.completion_tokens == 5
    assert full.usage.total_tokens == len(independent) + 5
    assert full.choices[0].finish_reason == "length"

    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **kw
        )
    )
    assert chunks[-1].usage is not None
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(chunks[-1].usage, k) for k in counts] == [getattr(full.usage, k) for k in counts]
    # The same prompt again: its full blocks come from the prefix cache
    assert chunks[-1].usage.prompt_tokens_details is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (len(independent) - 1) // 16 * 16


def test_completion_usage_counts_are_exact(tiny: openai.OpenAI, tiny_engine: Engine, tiny_name: str) -> None:
    prompts = [TINY_PROMPT, "Hello, world!"]
    n_prompt = sum(len(tiny_engine.tokenizer.encode(p)) for p in prompts)
    r = tiny.completions.create(
        model=tiny_name, prompt=prompts, n=2, max_tokens=7, temperature=0.5, extra_body={"ignore_eos": True}
    )
    assert len(r.choices) == 4 and [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage is not None
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 4 * 7
    assert r.usage.total_tokens == n_prompt + 28
    assert all(c.finish_reason == "length" for c in r.choices)


def test_usage_counts_stop_finish(tiny: openai.OpenAI, tiny_name: str) -> None:
    """A choice that ends early counts the tokens it really generated, not max_tokens."""
    r = tiny.completions.create(model=tiny_name, prompt=TINY_PROMPT, max_tokens=40, temperature=0, logprobs=0)
    assert r.usage is not None and r.choices[0].logprobs is not None
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.tokens or [])


# ---- finish reasons and n ------------------------------------------------------------------------------


def test_n3_non_streamed(tiny: openai.OpenAI, tiny_name: str) -> None:
    r = tiny.chat.completions.create(model=tiny_name, messages=TINY_CHAT, n=3, max_tokens=6, temperature=0.8, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage is not None and r.usage.completion_tokens <= 18


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_n3_stream_has_one_finish_reason_per_choice(tiny_server: str, tiny_name: str, path: str) -> None:
    body: dict[str, Any] = {"model": tiny_name, "n": 3, "max_tokens": 6, "temperature": 0.8, "seed": 7}
    body |= {"messages": TINY_CHAT} if "chat" in path else {"prompt": TINY_PROMPT}
    chunks = _raw_stream(tiny_server, path, body)
    finishes = Counter(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"] is not None)
    assert finishes == {0: 1, 1: 1, 2: 1}
    for i in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[-1]["finish_reason"] in ("stop", "length")  # the finish chunk is the choice's last
        assert all(ch["finish_reason"] is None for ch in mine[:-1])
        if "chat" in path:
            assert mine[0]["delta"] == {"role": "assistant"}
    assert all(len(c["choices"]) == 1 for c in chunks)


# ---- stream_options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_options_cases(tiny_server: str, tiny_name: str, path: str) -> None:
    body: dict[str, Any] = {"model": tiny_name, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    body |= {"messages": TINY_CHAT} if "chat" in path else {"prompt": TINY_PROMPT}

    plain = _raw_stream(tiny_server, path, body)
    assert all("usage" not in c for c in plain)
    assert all(c["choices"] for c in plain)

    off = _raw_stream(tiny_server, path, {**body, "stream_options": {"include_usage": False}})
    assert all(c.get("usage") is None and c["choices"] for c in off)

    on = _raw_stream(tiny_server, path, {**body, "stream_options": {"include_usage": True}})
    *content, last = on
    assert all("usage" in c and c["usage"] is None for c in content)
    assert last["choices"] == []
    usage = last["usage"]
    assert usage["completion_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4 and usage["prompt_tokens"] > 0
    assert last["id"] == content[0]["id"]


def test_stream_options_without_stream_is_400(tiny: openai.OpenAI, tiny_name: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        tiny.chat.completions.create(
            model=tiny_name, messages=TINY_CHAT, max_tokens=2, stream=False, stream_options={"include_usage": True}
        )
    assert e.value.status_code == 400
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "stream_options"
    with pytest.raises(openai.BadRequestError):
        tiny.completions.create(
            model=tiny_name, prompt="hi", max_tokens=2, stream=False, stream_options={"include_usage": True}
        )


def test_openai_client_sees_usage_chunk(tiny: openai.OpenAI, tiny_name: str) -> None:
    chunks = list(
        tiny.chat.completions.create(
            model=tiny_name,
            messages=TINY_CHAT,
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


# ---- chunk shape ---------------------------------------------------------------------------------------


def test_chat_chunk_shape(tiny_server: str, tiny_name: str) -> None:
    body = {"model": tiny_name, "messages": TINY_CHAT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    chunks = _raw_stream(tiny_server, "/v1/chat/completions", body)
    first = chunks[0]
    assert first["choices"][0]["delta"] == {"role": "assistant"}
    assert first["choices"][0]["finish_reason"] is None
    assert first["id"].startswith("chatcmpl-")
    assert {c["id"] for c in chunks} == {first["id"]}
    assert {c["created"] for c in chunks} == {first["created"]}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {tiny_name}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"][0]["delta"].get("content") in (None, "")
    assert all("content" in c["choices"][0]["delta"] for c in chunks[1:-1])


def test_completion_chunk_shape(tiny_server: str, tiny_name: str) -> None:
    body = {"model": tiny_name, "prompt": TINY_PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    chunks = _raw_stream(tiny_server, "/v1/completions", body)
    assert chunks[0]["id"].startswith("cmpl-")
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert all(isinstance(c["choices"][0]["text"], str) for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    full = httpx.post(f"{tiny_server}/v1/completions", json=body, timeout=60).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert full["object"] == "text_completion" and full["id"].startswith("cmpl-")


def test_echo_prepends_the_prompt(tiny: openai.OpenAI, tiny_name: str) -> None:
    kw: dict[str, Any] = {"model": tiny_name, "prompt": TINY_PROMPT, "max_tokens": 4, "temperature": 0}
    plain = tiny.completions.create(**kw).choices[0].text
    echoed = tiny.completions.create(echo=True, **kw).choices[0].text
    assert echoed == TINY_PROMPT + plain
    streamed = _text(list(tiny.completions.create(echo=True, stream=True, **kw)))
    assert streamed == echoed


# ---- stop strings --------------------------------------------------------------------------------------


def _stop_across_tokens(pieces: list[str], span: int) -> tuple[str, int]:
    """A stop string made of the end of one token, `span - 2` whole tokens and the start of another (first match)."""
    text = "".join(pieces)
    offset = 0
    for i in range(len(pieces) - span + 1):
        first, last = pieces[i], pieces[i + span - 1]
        head, tail = min(2, len(first)), min(2, len(last))
        if head and tail:
            stop = first[-head:] + "".join(pieces[i + 1 : i + span - 1]) + last[:tail]
            start = offset + len(first) - head
            if text.find(stop) == start:
                return stop, start
        offset += len(first)
    raise AssertionError(f"no stop string across {span} tokens in {pieces}")


@pytest.mark.parametrize("span", [2, 4])
def test_stop_string_split_across_tokens_never_leaks(
    client: openai.OpenAI, default_engine: Engine, default_server: str, span: int
) -> None:
    tok = default_engine.tokenizer
    ids = httpx.post(
        f"{default_server}/generate", json={"prompt": FRANCE, "max_tokens": 12, "temperature": 0}, timeout=60
    ).json()["token_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == tok.decode(ids)
    stop, start = _stop_across_tokens(pieces, span)
    expected = "".join(pieces)[:start]

    kw: dict[str, Any] = {"model": DEFAULT_MODEL_NAME, "prompt": FRANCE, "max_tokens": 12, "temperature": 0}
    full = client.completions.create(stop=[stop, "never-there"], **kw)
    assert full.choices[0].text == expected
    assert full.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(stop=stop, stream=True, **kw))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == expected
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert sum(c.choices[0].finish_reason is not None for c in chunks) == 1


def test_text_held_for_a_possible_stop_is_flushed_at_the_end(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": DEFAULT_MODEL_NAME, "prompt": FRANCE, "max_tokens": 4, "temperature": 0}
    text = client.completions.create(**kw).choices[0].text
    assert len(text.strip()) >= 3
    stop = text[-2:] + "§never§"  # the end of the text could start this stop string, but it never completes
    full = client.completions.create(stop=stop, **kw)
    assert full.choices[0].text == text and full.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(stop=stop, stream=True, **kw))
    assert _text(chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_in_chat(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": DEFAULT_MODEL_NAME, "messages": COUNT_CHAT, "max_tokens": 12, "temperature": 0}
    first = client.chat.completions.create(**kw, **TOP2).choices[0]
    text, steps = first.message.content or "", chat_steps(first.logprobs)
    stop = text[len(text) // 2 :][:3]  # from the middle of the count: e.g. "3, ", which ends it at "1, 2, "
    assert len(stop) == 3 and text.index(stop) > 0, text
    assert not any(stop in token for token in steps.tokens), steps.tokens  # across tokens
    full = client.chat.completions.create(stop=stop, **kw, **TOP2).choices[0]
    streamed = list(client.chat.completions.create(stop=stop, stream=True, **kw, **TOP2))
    # The first call may have computed the prompt, the others find it in the prefix cache: up to a near-tie
    agreement = Agreement(INT8_MARGIN)
    got = chat_steps(full.logprobs)
    if check_answers(agreement, got, steps.head(len(got.tokens)), what="stopped") is None:
        assert full.message.content == text[: text.index(stop)]
        assert full.finish_reason == "stop"
    check_texts(agreement, (_chat_text(streamed), _chat_steps(streamed)), (full.message.content or "", got), "streamed")
    agreement.assert_meaningful(0.75)


# ---- seed -------------------------------------------------------------------------------------------


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": DEFAULT_MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 8}
    kw |= {"temperature": 1.0, "extra_body": {"ignore_eos": True}}
    a = client.completions.create(seed=123, **kw).choices[0].text
    b = client.completions.create(seed=123, **kw).choices[0].text
    assert a == b
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert others - {a}, "different seeds all gave the seed-123 text"


def test_seed_with_n_gives_reproducible_distinct_choices(tiny: openai.OpenAI, tiny_name: str) -> None:
    kw: dict[str, Any] = {"model": tiny_name, "prompt": TINY_PROMPT, "max_tokens": 10, "n": 3, "seed": 5}
    kw |= {"temperature": 1.5, "extra_body": {"ignore_eos": True}}
    a = [c.text for c in tiny.completions.create(**kw).choices]
    b = [c.text for c in tiny.completions.create(**kw).choices]
    assert a == b
    assert len(set(a)) > 1


# ---- logprobs --------------------------------------------------------------------------------------


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME,
        messages=CHAT,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert len(lp.content) == 6 == (r.usage.completion_tokens if r.usage else -1)
    for entry in lp.content:
        assert entry.logprob <= 0
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3
        assert all(t <= 0 for t in tops)
        assert tops == sorted(tops, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)
        assert entry.token == entry.top_logprobs[0].token
    assert "".join(e.token for e in lp.content) == r.choices[0].message.content


def test_chat_logprobs_streamed(tiny: openai.OpenAI, tiny_name: str) -> None:
    chunks = list(
        tiny.chat.completions.create(
            model=tiny_name,
            messages=TINY_CHAT,
            max_tokens=5,
            temperature=0.7,
            seed=3,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert len(entries) == 5
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert e.logprob <= 0 and len(tops) == 2 and tops == sorted(tops, reverse=True)
        assert e.logprob <= tops[0] + 1e-5


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=DEFAULT_MODEL_NAME,
        prompt=FRANCE,
        max_tokens=5,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    for chosen, token, top in zip(lp.token_logprobs, lp.tokens, lp.top_logprobs, strict=True):
        values = list(top.values())
        assert len(values) == 2 and all(v <= 0 for v in values)
        assert values == sorted(values, reverse=True)
        assert chosen == pytest.approx(values[0], abs=1e-5) and next(iter(top)) == token
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


# ---- models -----------------------------------------------------------------------------------------


def test_models(client: openai.OpenAI, default_server: str) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [DEFAULT_MODEL_NAME]
    card = client.models.retrieve(DEFAULT_MODEL_NAME)
    assert card.id == DEFAULT_MODEL_NAME and card.object == "model"
    assert httpx.get(f"{default_server}/v1/models/{DEFAULT_MODEL_NAME}").status_code == 200


def test_unknown_model_is_404(tiny: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        tiny.chat.completions.create(model="no-such-model", messages=TINY_CHAT, max_tokens=2)
    assert e.value.status_code == 404
    assert isinstance(e.value.body, dict) and e.value.body.get("param") == "model"
    with pytest.raises(openai.NotFoundError):
        tiny.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        tiny.models.retrieve("no-such-model")


# ---- bad parameters ------------------------------------------------------------------------------------

_CHAT_OK: dict[str, Any] = {"messages": TINY_CHAT, "max_tokens": 2}
_TEXT_OK: dict[str, Any] = {"prompt": "hi", "max_tokens": 2}

BAD_PARAMS = [
    ("chat", {"temperature": 5}, "temperature"),
    ("text", {"temperature": -1}, "temperature"),
    ("chat", {"top_p": 0}, "top_p"),
    ("chat", {"n": 0}, "n"),
    ("text", {"n": 0}, "n"),
    ("chat", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("text", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"presence_penalty": -3}, "presence_penalty"),
    ("text", {"frequency_penalty": 3}, "frequency_penalty"),
    ("text", {"logprobs": 30}, "logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ("chat", {"top_logprobs": 3}, "top_logprobs"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("chat", {"messages": [{"content": "hi"}]}, "messages.0.role"),
    ("text", {"suffix": "!"}, "suffix"),
    ("chat", {"logit_bias": {"abc": 5}}, "logit_bias"),
    ("chat", {"logit_bias": {"1": 500}}, "logit_bias"),
    ("text", {"prompt": ""}, "prompt"),
    ("text", {"prompt": []}, "prompt"),
    ("text", {"prompt": [10**9]}, "prompt"),
    ("chat", {"max_tokens": "ten"}, "max_tokens"),
    ("chat", {"stream": True, "stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ("chat", {"stop": ["a", ""]}, None),
    ("text", {"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
]


def _create(c: openai.OpenAI, model: str, kind: str, params: dict[str, Any]) -> Any:
    base = _CHAT_OK if kind == "chat" else _TEXT_OK
    body = {**base, **params}
    # Pass everything through extra_body so the client sends values exactly as given.
    if kind == "chat":
        return c.chat.completions.create(model=model, messages=body.pop("messages"), extra_body=body)
    return c.completions.create(model=model, prompt=body.pop("prompt"), extra_body=body)


def test_every_bad_parameter_is_400_then_a_good_request_works(tiny: openai.OpenAI, tiny_name: str) -> None:
    for kind, params, param in BAD_PARAMS:
        with pytest.raises(openai.BadRequestError) as e:
            _create(tiny, tiny_name, kind, params)
        assert e.value.status_code == 400, params
        body = e.value.body
        assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body
        assert body["message"], params
        if param is not None:
            assert body["param"] == param, (params, body)
    ok = tiny.chat.completions.create(model=tiny_name, messages=TINY_CHAT, max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_context_overflow_is_400_with_counts(tiny: openai.OpenAI, tiny_name: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        tiny.completions.create(model=tiny_name, prompt="hi", max_tokens=1000)
    assert "maximum context length is 256 tokens" in e.value.message
    assert "1000 in the completion" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=100_000)
    assert "maximum context length" in e.value.message and "100000 in the completion" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        tiny.chat.completions.create(model=tiny_name, messages=[{"role": "user", "content": "fox " * 400}])
    assert "maximum context length" in e.value.message
    ok = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=2, temperature=0)
    assert ok.choices[0].message.content


def test_raw_errors_have_openai_shape(tiny_server: str) -> None:
    r = httpx.post(
        f"{tiny_server}/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{tiny_server}/v1/completions", json={"max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{tiny_server}/v1/chat/completions", json={"model": "nope", "messages": TINY_CHAT})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# ---- tokenize -----------------------------------------------------------------------------------------


def test_tokenize_detokenize_round_trip(default_server: str, default_engine: Engine) -> None:
    text = "Hello 😀 world, 你好 — café!"
    r = httpx.post(f"{default_server}/tokenize", json={"prompt": text})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == default_engine.tokenizer.encode(text)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 8192
    back = httpx.post(f"{default_server}/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    bad = httpx.post(f"{default_server}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400
    bad = httpx.post(f"{default_server}/tokenize", json={"prompt": "a", "messages": CHAT})
    assert bad.status_code == 400 and "exactly one of" in bad.json()["error"]["message"]


# ---- a model without a chat template -------------------------------------------------------------------


def test_model_without_chat_template_is_400_on_chat(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "no-template"))
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    engine = Engine(EngineConfig(model=str(model_dir), max_num_seqs=2), progress=False)
    try:
        with (
            running_server(create_app(engine=engine)) as base,
            openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as c,
        ):
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model="no-template", messages=TINY_CHAT, max_tokens=2)
            assert "chat template" in e.value.message
            ok = c.completions.create(model="no-template", prompt="hi", max_tokens=2)
            assert ok.choices[0].finish_reason in ("stop", "length")
            wait_idle(engine, 5)
    finally:
        engine.shutdown()


# ---- failures and disconnects --------------------------------------------------------------------------


def test_disconnect_with_n2_stream_aborts_both_choices(default_server: str, default_engine: Engine) -> None:
    wait_idle(default_engine, 10)
    before = default_engine.loop.stats().num_generation_tokens
    body = {"model": DEFAULT_MODEL_NAME, "prompt": "1, 2, 3, 4,", "n": 2, "max_tokens": 300, "temperature": 0}
    seen = b""
    with (
        httpx.Client(timeout=60) as c,
        c.stream("POST", f"{default_server}/v1/completions", json={**body, "stream": True}) as r,
    ):
        for chunk in r.iter_raw():
            seen += chunk
            if seen.count(b"\n\n") >= 6:
                break
        assert default_engine.loop.stats().num_running == 2
    wait_idle(default_engine, 10)
    produced = default_engine.loop.stats().num_generation_tokens - before
    assert produced < 100, produced


def test_engine_failure_mid_stream_sends_error_then_done(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(EngineConfig(model=str(tiny_model_dir), max_num_seqs=2), progress=False)
    real_run = engine.core.runner.run
    calls = 0

    def failing_run(batch: Any) -> Any:  # the forward pass itself breaks, for everyone, from the 4th step
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("injected failure")
        return real_run(batch)

    try:
        with running_server(create_app(engine=engine)) as base:
            monkeypatch.setattr(engine.core.runner, "run", failing_run)
            body = {"messages": TINY_CHAT, "max_tokens": 50, "temperature": 0, "ignore_eos": True}
            chunks = _raw_stream(base, "/v1/chat/completions", body)  # framing checked: [DONE] still last
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
            error = chunks[-1]["error"]
            assert set(error) == {"message", "type", "param", "code"} and "RuntimeError" in error["message"]
            assert all("error" not in c for c in chunks[:-1])
            # the engine restarted without the request: still serving, and each request that meets the
            # (still broken) step ends alone with the error
            assert httpx.get(f"{base}/health").status_code == 200
            with (
                openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as c,
                pytest.raises(openai.InternalServerError) as e,
            ):
                c.completions.create(model=engine.info.model_name, prompt="hi", max_tokens=2)
            assert e.value.status_code == 500 and "failed in the engine" in e.value.message
            broken = httpx.post(f"{base}/generate", json={"prompt": "hi"})
            assert broken.status_code == 500 and "failed in the engine" in broken.json()["detail"]
            monkeypatch.setattr(engine.core.runner, "run", real_run)
            assert httpx.post(f"{base}/generate", json={"prompt": "hi", "max_tokens": 3}).status_code == 200
    finally:
        engine.shutdown()


def test_completion_top_logprobs_keep_the_likelier_of_two_tokens_of_one_text() -> None:
    """Legacy completions key a step's top entries by text: two byte pieces that both show as U+FFFD are one
    key, which must hold the likelier token's value (the runner-up a client reads), not the last one's."""
    from tricklm.engine.request import TokenLogprob
    from tricklm.server.openai.serving import text_logprobs

    class Pieces:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return {1: "a", 2: "\ufffd", 3: "\ufffd"}[ids[0]]

    step = TokenLogprob(1, -0.1, [(1, -0.1), (2, -1.0), (3, -3.0)])
    out = text_logprobs(Pieces(), [step], 0)  # type: ignore[arg-type]
    assert out is not None and out["top_logprobs"] == [{"a": -0.1, "\ufffd": -1.0}]


def test_routes_answer_without_v1_and_carry_a_stable_fingerprint(tiny_server: str) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    bare = httpx.post(f"{tiny_server}/chat/completions", json=body, timeout=30)
    versioned = httpx.post(f"{tiny_server}/v1/chat/completions", json=body, timeout=30)
    assert bare.status_code == versioned.status_code == 200
    fingerprint = bare.json()["system_fingerprint"]
    assert fingerprint.startswith("fp_") and versioned.json()["system_fingerprint"] == fingerprint
    text = httpx.post(f"{tiny_server}/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30).json()
    assert text["system_fingerprint"] == fingerprint
    assert httpx.get(f"{tiny_server}/models", timeout=30).json()["data"]
    missing = httpx.post(f"{tiny_server}/completions", json={}, timeout=30)
    assert missing.status_code == 400 and "error" in missing.json()  # OpenAI's shape there too
    messages = httpx.post(f"{tiny_server}/messages", json={"messages": body["messages"]}, timeout=30)
    assert messages.status_code == 400 and messages.json()["type"] == "error"  # and Anthropic's


def test_speculative_decoding_is_counted_and_can_be_refused_per_request(default_server: str) -> None:
    """The shared default server does not speculate: its counters stay at zero, and the opt-out is accepted."""
    body = {"prompt": "Hello Hello Hello Hello", "max_tokens": 4, "speculative": False}
    assert httpx.post(f"{default_server}/v1/completions", json=body, timeout=60).status_code == 200
    metrics = httpx.get(f"{default_server}/metrics", timeout=10).text
    assert 'tricklm:spec_decode_num_draft_tokens_total{model_name="SmolLM2-135M-Instruct"} 0.0' in metrics
