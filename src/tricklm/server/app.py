"""The FastAPI application: lifespan (model loading in the background), health, metrics, routes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from tricklm import __version__
from tricklm.engine.engine import Engine
from tricklm.server import generate, openai_routes
from tricklm.server.errors import APIError, validation_error_to_openai
from tricklm.server.state import ServerState, get_state


def create_app(
    engine: Engine | None = None,
    engine_factory: Callable[[], Engine] | None = None,
    served_model_name: str | None = None,
) -> FastAPI:
    """Serve `engine`, or build one with `engine_factory` after startup (/health says 503 meanwhile).

    An engine passed in is not shut down with the app (the caller owns it); a factory-built one is.
    """
    state = ServerState(served_model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            state.set_engine(engine)
        elif engine_factory is not None:
            state.load_in_background(engine_factory)
        yield
        if engine is None and state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="tricklm", version=__version__, lifespan=lifespan)
    app.state.server = state
    app.include_router(generate.router)
    app.include_router(openai_routes.router)
    _add_error_handlers(app)
    _add_service_routes(app)
    return app


def _is_openai_route(request: Request) -> bool:
    return request.url.path.startswith("/v1/") or request.url.path in ("/tokenize", "/detokenize")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        if _is_openai_route(request):
            return validation_error_to_openai(list(exc.errors())).openai_response()
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> Response:
        return exc.openai_response() if _is_openai_route(request) else exc.detail_response()


def _add_service_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        code, body = get_state(request).health()
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(get_state(request).metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("tricklm.server").joinpath("static/index.html").read_text("utf-8"))
