"""What the routes share: the engine's facade once loaded (or why it is not), the served name, metrics."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fastapi import Request

from tricklm.engine.embedder import Embedder
from tricklm.engine.engine import ContextLengthError, Engine
from tricklm.engine.loop import EngineDeadError, QueueFullError
from tricklm.server.engine_client import EngineClient
from tricklm.server.errors import APIError, overloaded, unavailable
from tricklm.server.observability.metrics import Metrics
from tricklm.server.openai.response_store import ResponseStore


class ServerState:
    def __init__(
        self,
        served_model_name: str | None = None,
        request_timeout: float | None = None,
        reasoning_format: str = "auto",
        reasoning_budget: int | None = None,
    ) -> None:
        self.reasoning_format = reasoning_format
        self.reasoning_budget = reasoning_budget
        self.responses = ResponseStore()  # the Responses API's stored responses
        self.engine: Engine | None = None  # its owner's, to shut it down; everything else uses `client`
        self.client: EngineClient | None = None
        self.embedder: Embedder | None = None  # an embedding model, served instead of a generating one
        self.load_error: str | None = None
        self.load_thread: threading.Thread | None = None
        self._served_model_name = served_model_name
        self.request_timeout = request_timeout
        self.metrics = Metrics()
        self._ready = threading.Event()
        self.draining = False  # a shutdown has begun: no new requests, those in flight may finish

    def set_engine(self, engine: Engine) -> None:
        self.engine = engine
        self.client = EngineClient(engine, self.metrics, self.request_timeout)
        self.metrics.bind(self.client.stats)
        self._ready.set()

    def set_embedder(self, embedder: Embedder) -> None:
        """Serve an embedding model (no generating engine: the generating routes refuse with a 400)."""
        self.embedder = embedder
        self._ready.set()

    def load_in_background(self, factory: Callable[[], Engine | Embedder]) -> threading.Thread:
        def load() -> None:
            try:
                model = factory()
                if isinstance(model, Engine):
                    self.set_engine(model)
                else:
                    self.set_embedder(model)
            except Exception as e:  # reported by /health and every route, never a crash
                self.load_error = f"{type(e).__name__}: {e}"

        thread = threading.Thread(target=load, name="tricklm-load", daemon=True)
        thread.start()
        self.load_thread = thread
        return thread

    @property
    def served_model_name(self) -> str:
        if self._served_model_name:
            return self._served_model_name
        if self.embedder is not None:
            return self.embedder.model_name
        return self.client.model_name if self.client else "unknown"

    def health(self) -> tuple[int, dict[str, str]]:
        if self.draining:
            return 503, {"status": "draining", "detail": "the server is shutting down"}
        if self.client is None:
            if self.embedder is not None:
                return 200, {"status": "ok"}
            if self.load_error:
                return 503, {"status": "error", "detail": f"model failed to load: {self.load_error}"}
            return 503, {"status": "loading"}
        problem = self.client.problem()
        if problem is not None:
            return 503, {"status": problem[0], "detail": problem[1]}
        return 200, {"status": "ok"}

    def require_embedder(self) -> Embedder:
        if self.embedder is not None:
            return self.embedder
        if self.client is not None:
            raise APIError(
                400,
                f"the model `{self.served_model_name}` generates text; embeddings need an embedding model "
                "(tricklm serve --model all-MiniLM-L6-v2, or a sentence-transformers folder)",
                param="model",
                code="model_not_embedding",
            )
        _, body = self.health()
        raise unavailable(body.get("detail", "the model is still loading"))

    def require_engine(self) -> EngineClient:
        if self.embedder is not None and self.client is None:
            raise APIError(
                400,
                f"the model `{self.served_model_name}` makes embeddings, not text: use /v1/embeddings",
                param="model",
                code="model_not_generative",
            )
        code, body = self.health()
        # While the engine restarts after a failed step, a new request just waits in its queue
        if (code != 200 and body["status"] != "restarting") or self.client is None:
            raise unavailable(body.get("detail", "the model is still loading"))
        return self.client


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


@contextmanager
def engine_errors(prompt_param: str | None = None) -> Iterator[None]:
    """Map engine-side refusals to HTTP errors (status chosen once, here)."""
    try:
        yield
    except ContextLengthError as e:
        raise APIError(400, str(e), param=prompt_param, code="context_length_exceeded") from None
    except QueueFullError as e:
        raise overloaded(str(e)) from None
    except EngineDeadError as e:
        raise unavailable(str(e)) from None
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None
