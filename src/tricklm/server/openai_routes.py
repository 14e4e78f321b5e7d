"""OpenAI-compatible routes: chat and text completions (streamed as OpenAI does), models, tokenize."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from tricklm.engine.async_llm import AsyncEngine, RequestStream
from tricklm.engine.engine import Engine
from tricklm.engine.output import Delta, OutputProcessor
from tricklm.engine.request import TokenLogprob
from tricklm.engine.sampling_params import SamplingParams
from tricklm.server.access_log import record_stream
from tricklm.server.errors import GENERATION_ERRORS, APIError, documented_errors, stream_failure
from tricklm.server.generate import until_disconnect
from tricklm.server.openai_protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    TextCompletion,
    TokenizeRequest,
    TokenizeResponse,
    message_dicts,
)
from tricklm.server.prompts import encode_chat, encode_text
from tricklm.server.sse import DONE, SSEResponse, sse_event
from tricklm.server.state import ServerState, engine_errors, get_state
from tricklm.tokenizer import Tokenizer

router = APIRouter()


@dataclass
class Job:
    """One OpenAI request: its choices (one engine request each) and how to render them."""

    kind: str  # "chat" | "text"
    model: str
    streams: list[RequestStream]
    prompt_tokens: int
    tokenizer: Tokenizer
    echo: list[str] = field(default_factory=list)  # per choice, for completions with echo
    n: int = 1  # choices per prompt: streams[p * n + i] is prompt p's choice i
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex

    def close(self) -> None:
        for s in self.streams:
            s.close()


# ---- models, tokenize ----------------------------------------------------------------------------


@router.get("/v1/models", responses={200: {"model": ModelList}, **documented_errors(503)})
async def list_models(request: Request) -> JSONResponse:
    state = get_state(request)
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


@router.get("/v1/models/{model_id:path}", responses={200: {"model": ModelCard}, **documented_errors(404, 503)})
async def get_model(model_id: str, request: Request) -> JSONResponse:
    state = get_state(request)
    _check_model(state, model_id)
    return JSONResponse(_model_card(state))


def _model_card(state: ServerState) -> dict[str, Any]:
    card: dict[str, Any] = {"id": state.served_model_name, "object": "model", "created": 0, "owned_by": "tricklm"}
    if state.engine is not None:
        card["max_model_len"] = state.engine.max_model_len
    return card


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.served_model_name:
        raise APIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model", "model_not_found")


@router.post("/tokenize", responses={200: {"model": TokenizeResponse}, **documented_errors(400, 404, 503)})
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    engine = state.require_engine().engine
    _check_model(state, body.model)
    if body.messages is not None:
        ids = await encode_chat(engine, _messages(body.messages), body.add_generation_prompt)
    else:
        ids = await encode_text(engine, body.prompt or "", add_special_tokens=body.add_special_tokens)
    return JSONResponse({"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids})


@router.post("/detokenize", responses={200: {"model": DetokenizeResponse}, **documented_errors(400, 404, 503)})
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    engine = state.require_engine().engine
    _check_model(state, body.model)
    if any(t >= engine.tokenizer.vocab_size for t in body.tokens):
        raise APIError(
            400, f"token ids must be below the vocabulary size {engine.tokenizer.vocab_size}", param="tokens"
        )
    return JSONResponse({"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)})


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    try:
        return message_dicts(messages)
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="unsupported_content") from None


def _check_supported(body: SamplingFields) -> None:
    name = body.unsupported()
    if name is not None:
        raise APIError(400, f"'{name}' is not supported by this server yet", param=name, code="unsupported_parameter")


# ---- chat and text completions -------------------------------------------------------------------


def _generation_responses(body: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    streamed = {"text/event-stream": {"schema": {"type": "string", "description": "Server-Sent Events"}}}
    return {200: {"model": body, "content": streamed}, **documented_errors(*GENERATION_ERRORS)}


@router.post("/v1/chat/completions", responses=_generation_responses(ChatCompletion))
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    engine = state.require_engine()
    _check_model(state, body.model)
    _check_supported(body)
    prompt_ids = await encode_chat(engine.engine, _messages(body.messages), body.add_generation_prompt)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = _sampling_params(body, engine, max_tokens, logprobs)
    job = _start_job("chat", state, engine, [prompt_ids], params, body.n, len(prompt_ids))
    return await _respond(job, body, request, state)


@router.post("/v1/completions", responses=_generation_responses(TextCompletion))
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    engine = state.require_engine()
    _check_model(state, body.model)
    _check_supported(body)
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server", param="suffix", code="unsupported_parameter")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported", param="echo", code="unsupported_parameter")
    prompts = await _prompt_ids(engine.engine, body.prompt)
    params = _sampling_params(body, engine, body.max_tokens, body.logprobs)
    job = _start_job("text", state, engine, prompts, params, body.n, sum(len(p) for p in prompts))
    if body.echo:
        job.echo = [engine.engine.tokenizer.decode(p) for p in prompts for _ in range(body.n)]
    return await _respond(job, body, request, state)


async def _prompt_ids(engine: Engine, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    items: list[Any] = [prompt] if isinstance(prompt, str) else list(prompt)
    if items and all(isinstance(t, int) for t in items):
        items = [items]  # one prompt given as token ids
    if not items:
        raise APIError(400, "prompt must not be empty", param="prompt")
    out = []
    for item in items:
        ids = await encode_text(engine, item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if any(not 0 <= t < engine.tokenizer.vocab_size for t in ids):
            raise APIError(400, "prompt token ids must be within the vocabulary", param="prompt")
        out.append(ids)
    return out


def _sampling_params(
    body: SamplingFields, engine: AsyncEngine, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    defaults = engine.engine.generation_defaults
    bias = _logit_bias(body.logit_bias, engine.engine.tokenizer.vocab_size)

    def pick(value: Any, key: str, fallback: Any) -> Any:
        return value if value is not None else defaults.get(key, fallback)

    with engine_errors():
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick(body.temperature, "temperature", 1.0),
            top_p=pick(body.top_p, "top_p", 1.0),
            top_k=pick(body.top_k, "top_k", 0),
            min_p=pick(body.min_p, "min_p", 0.0),
            seed=body.seed,
            stop=tuple(body.stop_list),
            ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=pick(body.repetition_penalty, "repetition_penalty", 1.0),
            logit_bias=bias,
            logprobs=logprobs,
        )


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= token_id < vocab_size or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias entry {key}: {value} is out of range", param="logit_bias")
        out[token_id] = value
    return out


def _start_job(
    kind: str,
    state: ServerState,
    engine: AsyncEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    n: int,
    prompt_tokens: int,
) -> Job:
    num_choices = len(prompts) * n
    if num_choices > engine.engine.config.max_queue:
        # 429 would invite a retry that can never succeed
        raise APIError(
            400,
            f"this request asks for {num_choices} completions (prompts x n), more than the server queues at once "
            f"({engine.engine.config.max_queue})",
            param="n" if n > 1 else "prompt",
        )
    streams: list[RequestStream] = []
    try:
        with engine_errors("messages" if kind == "chat" else "prompt"):
            for ids in prompts:
                for i in range(n):
                    choice_params = params
                    if params.seed is not None and i:
                        choice_params = _with_seed(params, params.seed + i)  # distinct but reproducible choices
                    stream = engine.stream(ids, choice_params, prefix=kind)
                    record_stream(stream)
                    streams.append(stream)
    except BaseException:
        for s in streams:
            s.close()
        raise
    return Job(kind, state.served_model_name, streams, prompt_tokens, engine.engine.tokenizer, n=n)


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=seed)


async def _respond(job: Job, body: SamplingFields, request: Request, state: ServerState) -> Response:
    if body.stream:
        return SSEResponse(_stream(job, body.include_usage, state))
    done = await until_disconnect(request, _collect(job), job.close)
    for stream in job.streams:  # finished, failed or abandoned: each is counted once
        state.metrics.observe_finished(stream.processor)
    if done is None:
        return Response(status_code=499)
    failed = [s for s in job.streams if s.processor.finish_reason is None]
    if failed:
        raise stream_failure(failed[0])
    return JSONResponse(_full_response(job, done))


async def _collect(job: Job) -> list[OutputProcessor]:
    return list(await asyncio.gather(*(s.collect() for s in job.streams)))


def _full_response(job: Job, done: list[OutputProcessor]) -> dict[str, Any]:
    choices = []
    for i, proc in enumerate(done):
        echo = job.echo[i] if job.echo else ""
        choice: dict[str, Any] = {"index": i}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": proc.text}
            choice["logprobs"] = _chat_logprobs(job.tokenizer, proc.logprobs)
        else:
            choice["text"] = echo + proc.text
            choice["logprobs"] = _text_logprobs(job.tokenizer, proc.logprobs, 0)
        choice["finish_reason"] = proc.finish_reason
        choices.append(choice)
    return {
        "id": job.id,
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": _usage(job, done),
    }


def _usage(job: Job, done: list[OutputProcessor]) -> dict[str, Any]:
    completion = sum(len(p.token_ids) for p in done)
    # A prompt counts once, however many choices share it: its first choice's cache hit is the prompt's
    cached = sum(p.num_cached_tokens for p in done[:: job.n])
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": job.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


# ---- streaming -----------------------------------------------------------------------------------


async def _stream(job: Job, include_usage: bool, state: ServerState) -> AsyncIterator[bytes]:
    chunk = _chunk_factory(job, include_usage)
    offsets = [0] * len(job.streams)
    try:
        if job.kind == "chat":
            for i in range(len(job.streams)):
                yield chunk(i, {"delta": {"role": "assistant"}})
        elif job.echo:
            for i, text in enumerate(job.echo):
                yield chunk(i, {"text": text})
        async for i, delta in _merge(job.streams):
            if delta.error:
                yield sse_event(stream_failure(job.streams[i]).body())
                break
            for payload in _delta_payloads(job, delta, offsets, i):
                yield chunk(i, payload)
        else:
            if include_usage:
                yield sse_event(_usage_chunk(job))
    finally:
        for s in job.streams:  # a client that left counts as an abort, as in vLLM
            state.metrics.observe_finished(s.processor)
    yield DONE


def _delta_payloads(job: Job, delta: Delta, offsets: list[int], i: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if delta.text or delta.logprobs:
        if job.kind == "chat":
            out.append({"delta": {"content": delta.text}, "logprobs": _chat_logprobs(job.tokenizer, delta.logprobs)})
        else:
            lp = _text_logprobs(job.tokenizer, delta.logprobs, offsets[i])
            out.append({"text": delta.text, "logprobs": lp})
        offsets[i] += len(delta.text)
    if delta.finish_reason is not None:
        empty: dict[str, Any] = {"delta": {}} if job.kind == "chat" else {"text": ""}
        out.append({**empty, "finish_reason": delta.finish_reason})
    return out


def _chunk_factory(job: Job, include_usage: bool) -> Callable[[int, dict[str, Any]], bytes]:
    obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"

    def chunk(index: int, payload: dict[str, Any]) -> bytes:
        choice = {"index": index, "logprobs": None, "finish_reason": None, **payload}
        body: dict[str, Any] = {"id": job.id, "object": obj, "created": job.created, "model": job.model}
        body["choices"] = [choice]
        if include_usage:
            body["usage"] = None
        return sse_event(body)

    return chunk


def _usage_chunk(job: Job) -> dict[str, Any]:
    obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    usage = _usage(job, [s.processor for s in job.streams])
    return {"id": job.id, "object": obj, "created": job.created, "model": job.model, "choices": [], "usage": usage}


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave the deltas of several streams as they arrive; leaving early closes all of them."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                await queue.put((i, delta))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for s in streams:
            s.close()


# ---- logprobs ------------------------------------------------------------------------------------


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_logprobs(tokenizer: Tokenizer, logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for lp in logprobs:
        item = entry(lp.token_id, lp.logprob)
        item["top_logprobs"] = [entry(t, v) for t, v in lp.top]
        content.append(item)
    return {"content": content}


def _text_logprobs(tokenizer: Tokenizer, logprobs: list[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        text = _token_text(tokenizer, lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({_token_text(tokenizer, t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
