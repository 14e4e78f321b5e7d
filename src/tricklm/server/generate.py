"""`POST /generate`: the design doc's API, one endpoint that streams (SSE) or returns the whole result."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from tricklm.engine.async_llm import RequestStream
from tricklm.engine.llm import summarize
from tricklm.engine.sampling_params import SEED_RANGE, SamplingParams
from tricklm.server.access_log import record_stream
from tricklm.server.errors import GENERATION_ERRORS, DetailError, documented_errors, stream_failure
from tricklm.server.prompts import encode_text
from tricklm.server.sse import DONE, SSEResponse, sse_event
from tricklm.server.state import ServerState, engine_errors, get_state

router = APIRouter()
T = TypeVar("T")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(min_length=1, description="Text to continue")
    max_tokens: int = Field(128, ge=1, description="Upper bound on generated tokens")
    temperature: float = Field(0.7, ge=0.0, le=100.0, description="0 means greedy")
    stream: bool = Field(False, description="Stream tokens as Server-Sent Events")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1 disables top-k")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="Same seed, same text")
    stop: str | list[str] | None = Field(None, description="Stop strings (not included in the output)")


class GenerateResponse(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int = Field(description="Prompt tokens found in the prefix cache")
    completion_tokens: int
    time_to_first_token_ms: float
    total_time_ms: float
    tokens_per_second: float


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string", "description": "Server-Sent Events"}}}},
        **documented_errors(*GENERATION_ERRORS, model=DetailError),
    },
)
async def generate(body: GenerateRequest, request: Request) -> Response:
    state = get_state(request)
    stream = await _start(state, body)
    if body.stream:
        return SSEResponse(_sse(stream, state))
    proc = await until_disconnect(request, stream.collect(), stream.close)
    state.metrics.observe_finished(stream.processor)
    if proc is None:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    if proc.finish_reason is None:
        return stream_failure(stream).detail_response()
    return JSONResponse(summarize(proc))


async def _start(state: ServerState, body: GenerateRequest) -> RequestStream:
    engine = state.require_engine()
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    ids = await encode_text(engine.engine, body.prompt)
    with engine_errors("prompt"):
        params = SamplingParams(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=tuple(stop),
        )
        stream = engine.stream(ids, params, prefix="gen")
        record_stream(stream)
        return stream


async def _sse(stream: RequestStream, state: ServerState) -> AsyncIterator[bytes]:
    try:
        async for delta in stream:
            if delta.error:
                error = stream_failure(stream)
                yield sse_event({"error": {"message": error.message, "type": error.type}})
                break
            for i, token_id in enumerate(delta.token_ids):
                text = delta.text if i == len(delta.token_ids) - 1 else ""
                yield sse_event({"token": text, "token_id": token_id})
    finally:  # a client that left counts as an abort
        state.metrics.observe_finished(stream.processor)
    yield DONE


async def until_disconnect(request: Request, work: Awaitable[T], on_disconnect: Callable[[], None]) -> T | None:
    """Await `work`, but give up (call `on_disconnect`, return None) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            on_disconnect()
    if not task.done() or task.cancelled():
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
