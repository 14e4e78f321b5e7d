"""`POST /v1/embeddings`: OpenAI's embeddings API over an embedding model (engine/embedder.py).

`input` is a string, a list of strings, a list of token ids, or a list of such lists (token ids are
taken as they are, special tokens included or not as the caller chose). An input longer than the model
reads is refused, or cut to its length with `truncate: true` (as text-embeddings-inference does);
`dimensions` keeps the first N values and scales them back to unit length (Matryoshka models);
`encoding_format: "base64"` sends each vector as little-endian float32 bytes, as OpenAI's client asks by
default.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from fastapi.responses import Response
from pydantic import Field, field_validator
from starlette.concurrency import run_in_threadpool

from tricklm.engine.embedder import Embedder, EncoderBusy, EncoderStopped, InputTooLong
from tricklm.server.errors import APIError, overloaded, unavailable
from tricklm.server.openai.protocol import OpenAIBody
from tricklm.server.state import ServerState

MAX_INPUTS = 2048  # OpenAI's limit per request

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(OpenAIBody):
    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    truncate: bool = False
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: EmbeddingInput) -> EmbeddingInput:
        items = [value] if isinstance(value, str) else value
        if not items or any(len(item) == 0 for item in items if isinstance(item, str | list)):
            raise ValueError("input must not be empty, nor hold an empty string or list")
        if len(items) > MAX_INPUTS and not all(isinstance(i, int) for i in items):
            raise ValueError(f"at most {MAX_INPUTS} inputs a request")
        return value


async def create_embeddings(body: EmbeddingRequest, state: ServerState) -> Response:
    name, embedder = state.require_embedder(body.model)
    if body.dimensions is not None and body.dimensions > embedder.dimensions:
        message = f"dimensions must be at most {embedder.dimensions}, this model's"
        raise APIError(400, message, param="dimensions")
    # Tokenizing and turning thousands of floats into JSON stay off the event loop; the forward pass is the
    # encoder's thread's, awaited here without holding a thread of the pool (chat requests tokenize there)
    inputs = await run_in_threadpool(_token_inputs, embedder, body)
    with encoder_errors("input", ""):
        vectors = await encoder_result(state, embedder.embed_later(inputs))
    content = await run_in_threadpool(_payload, embedder, body, name, inputs, vectors)
    state.metrics.observe_encoder(name, len(inputs), sum(len(ids) for ids in inputs))
    return Response(content, media_type="application/json")


async def encoder_result(state: ServerState, result: Future[torch.Tensor]) -> torch.Tensor:
    """An encoder's answer, awaited on the event loop within the server's request timeout; a request that
    is cancelled or times out takes its inputs out of the encoder's queue if they are still waiting."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(result), timeout=state.request_timeout)
    except TimeoutError:
        message = f"the request ran longer than {state.request_timeout:g} s"
        raise APIError(504, message, "timeout_error", code="request_timeout") from None
    finally:
        result.cancel()  # a no-op once it is done


@contextmanager
def encoder_errors(param: str, hint: str) -> Iterator[None]:
    """An encoder's refusals as HTTP errors: too long an input (400, with `hint`), a full queue (429), an
    encoder that was shut down (503)."""
    try:
        yield
    except InputTooLong as e:
        raise APIError(400, f"{e}{hint}", param=param, code="context_length_exceeded") from None
    except EncoderBusy as e:
        raise overloaded(str(e)) from None
    except EncoderStopped as e:
        raise unavailable(str(e)) from None


def encoder_usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def _payload(
    embedder: Embedder, body: EmbeddingRequest, model: str, inputs: list[list[int]], vectors: torch.Tensor
) -> bytes:
    values = vectors.numpy()
    if body.dimensions is not None:
        # numpy, not torch: a torch op of this size on a request thread would start an OpenMP team there
        # (engine/embedder.py says what that costs the chat engine)
        values = values[:, : body.dimensions]
        if embedder.config.normalize:
            values = values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
        for i, v in enumerate(values)
    ]
    usage = encoder_usage(sum(len(ids) for ids in inputs))
    return json.dumps({"object": "list", "data": data, "model": model, "usage": usage}).encode()


def _token_inputs(embedder: Embedder, body: EmbeddingRequest) -> list[list[int]]:
    value = body.input
    if isinstance(value, str):
        raw = embedder.tokenize([value])
    elif all(isinstance(v, str) for v in value):
        raw = embedder.tokenize([str(v) for v in value])
    elif all(isinstance(v, int) for v in value):
        raw = [[int(v) for v in value]]  # type: ignore[arg-type]
    else:
        raw = [list(v) for v in value]  # type: ignore[arg-type]
    for ids in raw:
        if any(not 0 <= t < embedder.vocab_size for t in ids):
            raise APIError(400, f"token ids must be in [0, {embedder.vocab_size})", param="input")
    with encoder_errors("input", "; send truncate: true to cut it"):
        return [embedder.fit(ids, body.truncate) for ids in raw]


def _encoded(vector: np.ndarray, fmt: str) -> Any:
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
