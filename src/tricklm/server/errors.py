"""Error bodies: FastAPI's 422 detail form for /generate, the OpenAI shape for /v1/*."""

from __future__ import annotations

import math
import re
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from tricklm.engine.async_llm import RequestStream


class APIError(Exception):
    """An error with a status code and OpenAI fields; raised anywhere in a handler."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def openai_response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)

    def detail_response(self) -> JSONResponse:
        return JSONResponse({"detail": self.message}, status_code=self.status_code, headers=self.headers)

    def anthropic_body(self) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(
            self.status_code, "api_error" if self.status_code >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def anthropic_response(self) -> JSONResponse:
        return JSONResponse(self.anthropic_body(), status_code=self.status_code, headers=self.headers)


# Anthropic's error types by status (its API reference, "Errors")
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


# ---- what /openapi.json says about errors -------------------------------------------------------


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


class AnthropicErrorBody(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    type: str = "error"
    error: AnthropicErrorBody


class DetailError(BaseModel):
    detail: str | list[dict[str, Any]]


_STATUS_MEANINGS = {
    400: "Invalid request (the message names the parameter)",
    401: "Missing or wrong API key",
    404: "No such model or route",
    408: "The request's body did not arrive in time",
    413: "Request body over the server's limit",
    415: "The body is not sent as JSON (Content-Type: application/json)",
    429: "The queue is full; retry after the Retry-After header",
    500: "The engine failed this request",
    503: "The model is loading, the engine stopped, or the server is shutting down",
    504: "The request ran past the server's --request-timeout",
}
# Any route can answer these: the key check and the body guard run before it
COMMON_ERRORS = (401, 408, 413, 415)
GENERATION_ERRORS = (400, 404, 429, 500, 503, 504)


def documented_errors(*codes: int, model: type[BaseModel] = OpenAIError) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with its meaning and body schema."""
    return {code: {"model": model, "description": _STATUS_MEANINGS[code]} for code in (*COMMON_ERRORS, *codes)}


# The API routes' paths without /v1 (as llama-server answers them)
_BARE_PREFIXES = (
    "/chat/completions",
    "/completions",
    "/models",
    "/responses",
    "/messages",
    "/embeddings",
    "/rerank",
    "/v2/rerank",
)


def is_openai_path(path: str) -> bool:
    bare = any(path == p or path.startswith(p + "/") for p in _BARE_PREFIXES)
    return path.startswith("/v1/") or bare or path in ("/tokenize", "/detokenize")


def is_anthropic_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in ("/v1/messages", "/messages"))


def error_response(path: str, error: APIError) -> JSONResponse:
    """The error in the shape its route speaks: Anthropic's for /v1/messages, OpenAI's for the rest of
    /v1/*, FastAPI's `detail` elsewhere."""
    if is_anthropic_path(path):
        return error.anthropic_response()
    return error.openai_response() if is_openai_path(path) else error.detail_response()


def overloaded(message: str) -> APIError:
    return APIError(429, message, "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})


def unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", code="engine_unavailable", headers={"Retry-After": "5"})


def stream_failure(stream: RequestStream) -> APIError:
    """Why a request ended without a finish reason: its timeout (504, not worth retrying as it is: the
    openai client honours `x-should-retry`) or the engine (500)."""
    message = stream.processor.error or "generation failed in the engine"
    if stream.expired:
        return APIError(504, message, "timeout_error", code="request_timeout", headers={"x-should-retry": "false"})
    return APIError(500, message, "server_error", code="engine_error")


def validation_error_to_openai(errors: list[Any]) -> APIError:
    """Turn pydantic's error list into one 400 naming the first bad parameter."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _UNION_TAG.match(str(p))]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {msg}", code="invalid_json")
    if first.get("type") == "missing":
        if param is None:
            return APIError(400, "the request body is empty: send a JSON object", code="missing_body")
        return APIError(400, f"'{param}' is a required parameter", param=param, code="missing_required_parameter")
    if param is None:  # a check across fields: no single parameter to name
        return APIError(400, f"invalid request: {msg}", code="invalid_value")
    return APIError(400, f"invalid value for '{param}': {msg}", param=param, code="invalid_value")


# pydantic names the member of a union it tried (`prompt.str`, `prompt.list[int]`): not a field
_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-\w+\[.*\])$")


def validation_details(errors: Any) -> list[dict[str, Any]]:
    """FastAPI's 422 detail, minus what may not survive JSON: the offending input is echoed only if small."""
    out = []
    for err in errors:
        item = {"type": err.get("type"), "loc": list(err.get("loc", ())), "msg": err.get("msg")}
        value = err.get("input")
        small = isinstance(value, bool | int | str) and len(str(value)) <= 200
        if small or (isinstance(value, float) and math.isfinite(value)):
            item["input"] = value
        out.append(item)
    return out
