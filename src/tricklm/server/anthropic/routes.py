"""Anthropic-compatible routes: `POST /v1/messages` and `POST /v1/messages/count_tokens`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tricklm.server.anthropic.messages import count_tokens, create_message
from tricklm.server.anthropic.protocol import CountTokensRequest, MessagesRequest
from tricklm.server.errors import GENERATION_ERRORS, AnthropicError, documented_errors
from tricklm.server.sse import EVENT_STREAM
from tricklm.server.state import get_state

router = APIRouter()


@router.post("/messages", include_in_schema=False)  # for a base URL without /v1
@router.post(
    "/v1/messages",
    responses={200: {"content": EVENT_STREAM}, **documented_errors(*GENERATION_ERRORS, model=AnthropicError)},
)
async def messages(body: MessagesRequest, request: Request) -> Response:
    return await create_message(body, request, get_state(request))


@router.post("/messages/count_tokens", include_in_schema=False)
@router.post("/v1/messages/count_tokens", responses=documented_errors(400, 404, 503, model=AnthropicError))
async def messages_count_tokens(body: CountTokensRequest, request: Request) -> JSONResponse:
    return await count_tokens(body, get_state(request))
