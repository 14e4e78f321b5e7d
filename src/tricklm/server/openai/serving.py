"""What chat and text completions share: ids, chunks, usage, logprobs, and the checks every request gets."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi.responses import JSONResponse, Response

from tricklm.engine.output import OutputProcessor
from tricklm.engine.request import TokenLogprob
from tricklm.engine.structured import Grammar
from tricklm.server.engine_client import EngineClient
from tricklm.server.errors import APIError
from tricklm.server.openai.protocol import ResponseFormat, SamplingFields
from tricklm.server.serving import Job, Renderer
from tricklm.server.sse import sse_event
from tricklm.tokenizer import Tokenizer


def check_supported(body: SamplingFields) -> None:
    name = body.unsupported()
    if name is not None:
        raise APIError(400, f"'{name}' is not supported by this server yet", param=name, code="unsupported_parameter")


async def response_grammar(client: EngineClient, response_format: ResponseFormat | None) -> Grammar | None:
    """The grammar a `response_format` asks for, compiled (or a 400 that says why it cannot be)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return await client.json_schema_grammar({"type": "object"}, "response_format")
    assert response_format.json_schema is not None  # the model's validator insists
    schema = response_format.json_schema.schema_
    return await client.json_schema_grammar(schema if schema is not None else {}, "response_format.json_schema")


class OpenAIRenderer(Renderer):
    """OpenAI's envelope around each chunk and body; subclasses fill in the choices."""

    object_name = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, model: str, tokenizer: Tokenizer, include_usage: bool, fingerprint: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.include_usage = include_usage
        self.fingerprint = fingerprint
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())

    def chunk(self, index: int, payload: dict[str, Any]) -> bytes:
        choice = {"index": index, "logprobs": None, "finish_reason": None, **payload}
        body: dict[str, Any] = {**self._envelope(self.chunk_object), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return sse_event(body)

    def closing(self, job: Job) -> list[bytes]:
        if not self.include_usage:
            return []
        usage = usage_of(job, [s.processor for s in job.streams])
        return [sse_event({**self._envelope(self.chunk_object), "choices": [], "usage": usage})]

    def error_event(self, error: APIError) -> bytes:
        return sse_event(error.body())

    def response(self, job: Job, done: list[OutputProcessor]) -> Response:
        choices = [self.choice(i, proc) for i, proc in enumerate(done)]
        return JSONResponse({**self._envelope(self.object_name), "choices": choices, "usage": usage_of(job, done)})

    def choice(self, index: int, proc: OutputProcessor) -> dict[str, Any]:
        raise NotImplementedError

    def _envelope(self, obj: str) -> dict[str, Any]:
        envelope = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        return {**envelope, "system_fingerprint": self.fingerprint}


def usage_of(job: Job, done: list[OutputProcessor]) -> dict[str, Any]:
    completion = sum(len(p.token_ids) for p in done)
    # A prompt counts once, however many choices share it: its first choice's cache hit is the prompt's
    cached = sum(p.num_cached_tokens for p in done[:: job.n])
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": job.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {
            "reasoning_tokens": sum(p.reasoning_tokens for p in done),
            # speculative decoding's drafts, as OpenAI reports a predicted output's tokens
            "accepted_prediction_tokens": sum(p.num_accepted_tokens for p in done),
            "rejected_prediction_tokens": sum(p.num_draft_tokens - p.num_accepted_tokens for p in done),
        },
    }


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer: Tokenizer, logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for lp in logprobs:
        item = entry(lp.token_id, lp.logprob)
        item["top_logprobs"] = [entry(t, v) for t, v in lp.top]
        content.append(item)
    return {"content": content}


def text_logprobs(tokenizer: Tokenizer, logprobs: list[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        top: dict[str, float] = {}
        for t, v in lp.top:  # most likely first: of two tokens of one text (byte pieces), the likelier one's value
            top.setdefault(token_text(tokenizer, t), v)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
