"""`POST /v1/completions`: text in, text out, as OpenAI's legacy completions API."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response

from tricklm.engine.output import Delta, OutputProcessor
from tricklm.server.engine_client import EngineClient
from tricklm.server.errors import APIError
from tricklm.server.openai.protocol import CompletionRequest
from tricklm.server.openai.serving import (
    OpenAIRenderer,
    check_supported,
    response_grammar,
    text_logprobs,
)
from tricklm.server.sampling import to_sampling_params
from tricklm.server.serving import Job, respond, start_job
from tricklm.server.state import ServerState
from tricklm.tokenizer import Tokenizer


async def create_completion(body: CompletionRequest, request: Request, state: ServerState) -> Response:
    client = state.require_engine(body.model)
    check_supported(body)
    _check_completion_fields(body)
    prompts = await _prompt_ids(client, body.prompt)
    params = to_sampling_params(client, body, await response_grammar(client, body.response_format))
    job = start_job(client, prompts, params, body.n, prefix="text", prompt_param="prompt")
    echo = [client.tokenizer.decode(p) for p in prompts for _ in range(body.n)] if body.echo else []
    renderer = CompletionRenderer(client.served_name, client.tokenizer, body.include_usage, echo)
    renderer.fingerprint = client.system_fingerprint
    return await respond(job, renderer, body.stream, request)


def _check_completion_fields(body: CompletionRequest) -> None:
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server", param="suffix", code="unsupported_parameter")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported", param="echo", code="unsupported_parameter")


async def _prompt_ids(client: EngineClient, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    items: list[Any] = [prompt] if isinstance(prompt, str) else list(prompt)
    if items and all(isinstance(t, int) for t in items):
        items = [items]  # one prompt given as token ids
    if not items:
        raise APIError(400, "prompt must not be empty", param="prompt")
    out = []
    for item in items:
        ids = await client.encode_text(item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if any(not 0 <= t < client.vocab_size for t in ids):
            raise APIError(400, "prompt token ids must be within the vocabulary", param="prompt")
        out.append(ids)
    return out


class CompletionRenderer(OpenAIRenderer):
    object_name = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, model: str, tokenizer: Tokenizer, include_usage: bool, echo: list[str]) -> None:
        super().__init__(model, tokenizer, include_usage)
        self.echo = echo  # per choice, with echo=true
        self._offsets: dict[int, int] = {}  # text offset per choice, for logprobs

    def opening(self, job: Job) -> list[bytes]:
        return [self.chunk(i, {"text": text}) for i, text in enumerate(self.echo)]

    def delta(self, job: Job, index: int, delta: Delta) -> list[bytes]:
        out = []
        if delta.text or delta.logprobs:
            offset = self._offsets.get(index, 0)
            lp = text_logprobs(self.tokenizer, delta.logprobs, offset)
            out.append(self.chunk(index, {"text": delta.text, "logprobs": lp}))
            self._offsets[index] = offset + len(delta.text)
        if delta.finish_reason is not None:
            out.append(self.chunk(index, {"text": "", "finish_reason": delta.finish_reason}))
        return out

    def choice(self, index: int, proc: OutputProcessor) -> dict[str, Any]:
        echo = self.echo[index] if self.echo else ""
        return {
            "index": index,
            "text": echo + proc.text,
            "logprobs": text_logprobs(self.tokenizer, proc.logprobs, 0),
            "finish_reason": proc.finish_reason,
        }
