"""OpenAI-compatible routes: chat and text completions, responses (chat.py, completions.py, responses.py),
models, tokenize."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from tricklm.server.errors import GENERATION_ERRORS, APIError, documented_errors
from tricklm.server.openai.chat import chat_messages, create_chat_completion
from tricklm.server.openai.completions import create_completion
from tricklm.server.openai.embeddings import EmbeddingRequest, create_embeddings
from tricklm.server.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TextCompletion,
    TokenizeRequest,
    TokenizeResponse,
)
from tricklm.server.openai.responses import create_response
from tricklm.server.openai.responses_protocol import ResponsesRequest
from tricklm.server.sse import EVENT_STREAM
from tricklm.server.state import GENERATE, ServedModel, get_state

router = APIRouter()


# Clients configured with a bare base URL (no /v1) call these paths, as llama-server answers them
@router.get("/models", include_in_schema=False)
@router.get("/v1/models", responses={200: {"model": ModelList}, **documented_errors(503)})
async def list_models(request: Request) -> JSONResponse:
    state = get_state(request)
    # a model that failed to load is not listed (/health says why)
    cards = [_model_card(m) for m in state.models if m.name and not m.load_error]
    return JSONResponse({"object": "list", "data": cards})


@router.get("/models/{model_id:path}", include_in_schema=False)
@router.get("/v1/models/{model_id:path}", responses={200: {"model": ModelCard}, **documented_errors(404, 503)})
async def get_model(model_id: str, request: Request) -> JSONResponse:
    model = get_state(request).find(model_id, GENERATE)
    return JSONResponse(_model_card(model))


def _model_card(model: ServedModel) -> dict[str, Any]:
    card: dict[str, Any] = {"id": model.name, "object": "model", "created": 0, "owned_by": "tricklm"}
    if model.client is not None:
        card["max_model_len"] = model.client.max_model_len
    if model.encoder is not None:
        card["max_model_len"] = model.encoder.max_tokens
    if model.task is not None:
        card["task"] = model.task  # what the model is for: generate, embed or rerank
    return card


@router.post("/tokenize", responses={200: {"model": TokenizeResponse}, **documented_errors(400, 404, 503)})
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    client = state.require_engine(body.model)
    if body.messages is not None:
        ids = await client.encode_chat(chat_messages(body.messages), body.add_generation_prompt)
    else:
        ids = await client.encode_text(body.prompt or "", add_special_tokens=body.add_special_tokens)
    return JSONResponse({"count": len(ids), "max_model_len": client.max_model_len, "tokens": ids})


@router.post("/detokenize", responses={200: {"model": DetokenizeResponse}, **documented_errors(400, 404, 503)})
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    client = state.require_engine(body.model)
    if any(t >= client.vocab_size for t in body.tokens):
        raise APIError(400, f"token ids must be below the vocabulary size {client.vocab_size}", param="tokens")
    return JSONResponse({"prompt": client.tokenizer.decode(body.tokens, skip_special_tokens=False)})


def _generation_responses(body: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": body, "content": EVENT_STREAM}, **documented_errors(*GENERATION_ERRORS)}


@router.post("/chat/completions", include_in_schema=False)
@router.post("/v1/chat/completions", responses=_generation_responses(ChatCompletion))
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await create_chat_completion(body, request, get_state(request))


@router.post("/completions", include_in_schema=False)
@router.post("/v1/completions", responses=_generation_responses(TextCompletion))
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await create_completion(body, request, get_state(request))


@router.post("/responses", include_in_schema=False)
@router.post("/v1/responses", responses={200: {"content": EVENT_STREAM}, **documented_errors(*GENERATION_ERRORS)})
async def responses(body: ResponsesRequest, request: Request) -> Response:
    return await create_response(body, request, get_state(request))


@router.get("/responses/{response_id}", include_in_schema=False)
@router.get("/v1/responses/{response_id}", responses=documented_errors(404))
async def get_response(response_id: str, request: Request) -> JSONResponse:
    """A stored response, as it was returned."""
    return JSONResponse(get_state(request).responses.get(response_id).body)


@router.delete("/responses/{response_id}", include_in_schema=False)
@router.delete("/v1/responses/{response_id}", responses=documented_errors(404))
async def delete_response(response_id: str, request: Request) -> JSONResponse:
    get_state(request).responses.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


@router.post("/embeddings", include_in_schema=False)
@router.post("/v1/embeddings", responses=documented_errors(400, 404, 429, 503, 504))
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """Vectors of texts or token ids, from an embedding model (`tricklm serve --model all-MiniLM-L6-v2`)."""
    return await create_embeddings(body, get_state(request))
