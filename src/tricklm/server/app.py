"""The FastAPI application: lifespan (model loading in the background), health, metrics, routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles

from tricklm import __version__
from tricklm.config import ServerConfig
from tricklm.engine.embedder import EncoderEngine
from tricklm.engine.engine import Engine
from tricklm.server import generate, rerank
from tricklm.server.anthropic import routes as anthropic_routes
from tricklm.server.errors import (
    APIError,
    documented_errors,
    error_response,
    is_openai_path,
    validation_details,
    validation_error_to_openai,
)
from tricklm.server.middleware.access import KeyGuard, SecurityHeaders, cors_options
from tricklm.server.middleware.access_log import AccessLog
from tricklm.server.middleware.body_guard import BodyGuard
from tricklm.server.observability.stats_log import StatsLogger
from tricklm.server.openai import routes as openai_routes
from tricklm.server.state import Model, ServerState, get_state

logger = logging.getLogger(__name__)


def create_app(
    config: ServerConfig | None = None,
    *,
    engine: Engine | None = None,
    engine_factory: Callable[[], Model] | None = None,
    embedder: EncoderEngine | None = None,
    models: Sequence[Model] = (),
    factories: Sequence[Callable[[], Model]] = (),
    names: Sequence[str | None] = (),
    on_load_error: Callable[[Exception], None] | None = None,
) -> FastAPI:
    """Serve `engine`, or build one with `engine_factory` after startup (/health says 503 meanwhile), with the
    settings `config` holds (`tricklm serve`'s options; the defaults where none is given).

    An engine passed in is not shut down with the app (the caller owns it); a factory-built one is. An
    `embedder` (an encoder, or a factory that builds one) serves an embedding or reranking model:
    /v1/embeddings or /v1/rerank, and 400s from the generating routes. Several models: `models` (built) or
    `factories` (loaded one after another, `names` their served names if known before), in that order;
    each request's `model` picks one.
    With `api_keys`, every route but /health and the chat page needs one (`access.py`); CORS is closed
    unless `allowed_origins` names some. A request running longer than `request_timeout` seconds ends with
    an error (streams: an error event, then [DONE]) and frees its slot; a body that takes longer than
    `body_timeout` seconds to arrive gets 408. Each request gets an access line
    (with its prompt and output text if `log_requests`), and every `stats_interval` seconds a stats line.
    """
    config = config or ServerConfig()
    state = ServerState(
        config.served_model_names, config.request_timeout, config.reasoning_format, config.reasoning_budget
    )
    built = [m for m in (engine, embedder) if m is not None] + list(models)
    to_load = ([engine_factory] if engine_factory is not None else []) + list(factories)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for model in built:
            state.add(model)
        if to_load:
            state.load_in_background(to_load, names, on_load_error)
        stats = None
        if config.stats_interval:
            stats = asyncio.create_task(StatsLogger(state, config.stats_interval).run(), name="tricklm-stats")
        yield
        if stats is not None:
            stats.cancel()
        state.shutdown()

    app = FastAPI(title="tricklm", version=__version__, lifespan=lifespan)
    app.state.server = state
    app.include_router(generate.router)
    app.include_router(openai_routes.router)
    app.include_router(anthropic_routes.router)
    app.include_router(rerank.router)
    # Outermost last: headers on everything, CORS preflight before the key check, the key before the body
    app.add_middleware(BodyGuard, max_bytes=config.max_request_bytes, body_timeout=config.body_timeout)
    app.add_middleware(KeyGuard, keys=config.api_keys, metrics_public=config.metrics_public)
    cors = cors_options(config.allowed_origins)
    if cors is not None:
        app.add_middleware(CORSMiddleware, **cors)  # type: ignore[arg-type]
    app.add_middleware(SecurityHeaders)
    # Outermost: every request gets its id and its line, refusals too
    app.add_middleware(AccessLog, log_requests=config.log_requests)
    _add_error_handlers(app)
    _add_service_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        if is_openai_path(request.url.path):
            return error_response(request.url.path, validation_error_to_openai(list(exc.errors())))
        return JSONResponse({"detail": validation_details(exc.errors())}, status_code=422)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> Response:
        return error_response(request.url.path, exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = _HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request_error")
        error = APIError(exc.status_code, str(exc.detail), kind, headers=dict(exc.headers or {}))
        return error_response(request.url.path, error)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # A bug, not the client's fault: logged in full, answered in the route's shape (never plain text)
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        error = APIError(500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error")
        return error_response(request.url.path, error)


_HTTP_ERROR_TYPES = {404: "NotFoundError", 405: "invalid_request_error"}


class Health(BaseModel):
    status: str
    detail: str | None = None


_UNHEALTHY = "Loading, restarting, draining, or stopped (the detail says why)"


def _add_service_routes(app: FastAPI) -> None:
    @app.get("/health", responses={200: {"model": Health}, 503: {"model": Health, "description": _UNHEALTHY}})
    async def health(request: Request) -> JSONResponse:
        code, body = get_state(request).health()
        return JSONResponse(body, status_code=code)

    @app.get("/metrics", response_class=PlainTextResponse, responses=documented_errors())
    async def metrics(request: Request) -> Response:
        return Response(get_state(request).metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("tricklm.server").joinpath("static/index.html").read_text("utf-8"))

    # The page's script, styles and vendored libraries: served from the package, so it works offline
    app.mount("/static", StaticFiles(packages=[("tricklm.server", "static")]), name="static")

    @app.api_route("/favicon.ico", methods=["GET", "HEAD"], include_in_schema=False)
    async def favicon() -> Response:
        icon = resources.files("tricklm.server").joinpath("static/favicon.svg").read_bytes()
        return Response(icon, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})
