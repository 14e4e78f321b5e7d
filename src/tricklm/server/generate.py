"""`POST /generate`: the design doc's API, one endpoint that streams (SSE) or returns the whole result."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from tricklm.engine.llm import summarize
from tricklm.engine.output import Delta, OutputProcessor
from tricklm.engine.sampling_params import SEED_RANGE
from tricklm.server.errors import GENERATION_ERRORS, APIError, DetailError, documented_errors
from tricklm.server.openai.protocol import ResponseFormat
from tricklm.server.openai.serving import response_grammar
from tricklm.server.sampling import to_sampling_params
from tricklm.server.serving import Job, Renderer, respond, start_job
from tricklm.server.sse import EVENT_STREAM, sse_event
from tricklm.server.state import get_state

router = APIRouter()


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(min_length=1, description="Text to continue")
    max_tokens: int = Field(128, ge=1, description="Upper bound on generated tokens")
    temperature: float | None = Field(
        None, ge=0.0, le=100.0, description="0 means greedy; unset: the model's generation_config, else 1"
    )
    stream: bool = Field(False, description="Stream tokens as Server-Sent Events")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="0 or -1 disables top-k")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="Same seed, same text")
    stop: str | list[str] | None = Field(None, description="Stop strings (not included in the output)")
    response_format: ResponseFormat | None = Field(None, description="As OpenAI's: text, json_object, json_schema")
    model: str | None = Field(None, description="Which served model (unset: the first that generates text)")

    def sampling_values(self) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        values = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p}
        return {**values, "max_tokens": self.max_tokens, "seed": self.seed, "stop": tuple(stop)}


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
        200: {"content": EVENT_STREAM},
        **documented_errors(*GENERATION_ERRORS, model=DetailError),
    },
)
async def generate(body: GenerateRequest, request: Request) -> Response:
    client = get_state(request).require_engine(body.model)
    ids = await client.encode_text(body.prompt)
    params = to_sampling_params(client, body, await response_grammar(client, body.response_format))
    job = start_job(client, [ids], params, prefix="gen")
    return await respond(job, GenerateRenderer(), body.stream, request)


class GenerateRenderer(Renderer):
    """One event per token ({"token", "token_id"}), errors as {"detail": ...} like FastAPI's own."""

    def delta(self, job: Job, index: int, delta: Delta) -> list[bytes]:
        last = len(delta.token_ids) - 1
        return [
            sse_event({"token": delta.text if i == last else "", "token_id": token_id})
            for i, token_id in enumerate(delta.token_ids)
        ]

    def error_event(self, error: APIError) -> bytes:
        return sse_event({"error": {"message": error.message, "type": error.type}})

    def response(self, job: Job, done: list[OutputProcessor]) -> Response:
        return JSONResponse(summarize(done[0]))

    def failure(self, error: APIError) -> Response:
        return error.detail_response()
