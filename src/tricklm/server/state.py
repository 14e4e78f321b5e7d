"""What the routes share: the models served (each a generating engine's facade or an encoder, once loaded, or
why it is not), metrics, the stored responses.

A server serves one model or several (`tricklm serve --model A --model B`). A request's `model` picks one by
its served name; a request that names none gets the first model that does what the route does (generate
text, embed, rerank), so that a client written for a one-model server works unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from fastapi import Request

from tricklm.engine.embedder import Embedder, EncoderEngine, Reranker
from tricklm.engine.engine import ContextLengthError, Engine
from tricklm.engine.loop import EngineDeadError, QueueFullError
from tricklm.server.engine_client import EngineClient
from tricklm.server.errors import APIError, overloaded, unavailable
from tricklm.server.observability.metrics import Metrics
from tricklm.server.openai.response_store import ResponseStore

GENERATE, EMBED, RERANK = "generate", "embed", "rerank"
Model = Engine | EncoderEngine
# What each task's routes are, for the message that sends a request to the right one
_ROUTES = {
    GENERATE: "the chat, completions, messages and responses routes",
    EMBED: "/v1/embeddings",
    RERANK: "/v1/rerank",
}


class ServedModel:
    """One model of the server: a generating engine (used through `client`) or an encoder, or why not yet."""

    def __init__(self, name: str | None) -> None:
        self.name = name  # the served name; None until a model loaded without one given is in
        self.engine: Engine | None = None  # its owner's, to shut down; everything else uses `client`
        self.owned = False  # built by the app (from a factory): the app shuts it down
        self.client: EngineClient | None = None
        self.encoder: EncoderEngine | None = None
        self.load_error: str | None = None

    @property
    def task(self) -> str | None:
        if self.client is not None:
            return GENERATE
        return self.encoder.task if self.encoder is not None else None

    def health(self) -> tuple[int, dict[str, str]]:
        if self.client is not None:
            problem = self.client.problem()
            if problem is not None:
                return 503, {"status": problem[0], "detail": problem[1]}
            return 200, {"status": "ok"}
        if self.encoder is not None:
            return 200, {"status": "ok"}
        if self.load_error:
            return 503, {"status": "error", "detail": f"model failed to load: {self.load_error}"}
        return 503, {"status": "loading"}


class ServerState:
    def __init__(
        self,
        served_model_names: Sequence[str] = (),
        request_timeout: float | None = None,
        reasoning_format: str = "auto",
        reasoning_budget: int | None = None,
    ) -> None:
        self.reasoning_format = reasoning_format
        self.reasoning_budget = reasoning_budget
        self.responses = ResponseStore()  # the Responses API's stored responses
        self.models: list[ServedModel] = []
        self.load_thread: threading.Thread | None = None
        self._names = tuple(served_model_names)  # --served-model-name, in the order of the models
        self.request_timeout = request_timeout
        self.metrics = Metrics()
        self.draining = False  # a shutdown has begun: no new requests, those in flight may finish

    def _slot(self, name: str | None = None) -> ServedModel:
        given = self._names[len(self.models)] if len(self.models) < len(self._names) else None
        slot = ServedModel(given or name)
        self.models.append(slot)
        return slot

    def add(self, model: Model, owned: bool = False, slot: ServedModel | None = None) -> ServedModel:
        """Serve `model` (in `slot`, a place kept for it while it loaded, or a new one)."""
        slot = slot or self._slot()
        slot.owned = owned
        if isinstance(model, Engine):
            slot.engine = model
            slot.client = EngineClient(model, self.metrics, self.request_timeout, slot.name)
            slot.name = slot.client.served_name
        else:
            slot.encoder = model
            slot.name = slot.name or model.model_name
        if self.clients():  # encoders compute beside a generating engine in the background from now on
            for m in self.models:
                if m.encoder is not None:
                    m.encoder.background = True
        return slot

    def load_in_background(
        self,
        factories: Sequence[Callable[[], Model]],
        names: Sequence[str | None] = (),
        on_error: Callable[[Exception], None] | None = None,
    ) -> threading.Thread:
        """Load the models one after another (a model that fails stops the rest, and `on_error` hears of
        it); each slot answers 503 while it waits. `names`: each model's served name when known before."""
        slots = [self._slot(names[i] if i < len(names) else None) for i in range(len(factories))]

        def load() -> None:
            for i, (slot, factory) in enumerate(zip(slots, factories, strict=True)):
                try:
                    self.add(factory(), owned=True, slot=slot)
                except Exception as e:  # reported by /health and every route, never a crash
                    slot.load_error = f"{type(e).__name__}: {e}"
                    for rest in slots[i + 1 :]:
                        rest.load_error = f"not loaded: {slot.name or 'an earlier model'} failed to load"
                    if on_error is not None:
                        on_error(e)
                    return

        thread = threading.Thread(target=load, name="tricklm-load", daemon=True)
        thread.start()
        self.load_thread = thread
        return thread

    def clients(self) -> list[EngineClient]:
        return [m.client for m in self.models if m.client is not None]

    def health(self) -> tuple[int, dict[str, str]]:
        if self.draining:
            return 503, {"status": "draining", "detail": "the server is shutting down"}
        if not self.models:
            return 503, {"status": "loading"}
        for model in self.models:
            code, body = model.health()
            if code != 200:
                if len(self.models) > 1 and "detail" in body:
                    body = {**body, "detail": f"{model.name}: {body['detail']}"}
                return code, body
        return 200, {"status": "ok"}

    def find(self, name: str | None, task: str) -> ServedModel:
        """The model a request's `model` names (404 if none has that name), or, when it names none, the first
        model for `task` (the only model, whatever it does, on a one-model server)."""
        if name is not None:
            for model in self.models:
                if model.name == name or (model.name is None and len(self.models) == 1):
                    return model
            raise APIError(404, f"The model `{name}` does not exist.", "NotFoundError", "model", "model_not_found")
        for model in self.models:
            if model.task == task:
                return model
        if self.models:
            return next((m for m in self.models if m.task is None), self.models[0])
        raise unavailable("the model is still loading")

    def _ready(self, name: str | None, task: str) -> ServedModel:
        if self.draining:
            raise unavailable("the server is shutting down")
        model = self.find(name, task)
        if model.task is None:
            _, body = model.health()
            raise unavailable(body.get("detail", "the model is still loading"))
        if model.task != task:
            raise _wrong_task(model, task)
        return model

    def require_engine(self, name: str | None = None) -> EngineClient:
        model = self._ready(name, GENERATE)
        assert model.client is not None
        code, body = model.health()
        # While the engine restarts after a failed step, a new request just waits in its queue
        if code != 200 and body["status"] != "restarting":
            raise unavailable(body.get("detail", "the model cannot take requests"))
        return model.client

    def require_embedder(self, name: str | None = None) -> tuple[str, Embedder]:
        model = self._ready(name, EMBED)
        assert isinstance(model.encoder, Embedder) and model.name is not None
        return model.name, model.encoder

    def require_reranker(self, name: str | None = None) -> tuple[str, Reranker]:
        model = self._ready(name, RERANK)
        assert isinstance(model.encoder, Reranker) and model.name is not None
        return model.name, model.encoder

    def shutdown(self) -> None:
        for model in self.models:
            if model.client is not None:
                model.client.shutdown()
            if model.owned and model.engine is not None:
                model.engine.shutdown()
            if model.owned and model.encoder is not None:
                model.encoder.shutdown()


def _wrong_task(model: ServedModel, task: str) -> APIError:
    does = {GENERATE: "generates text", EMBED: "makes embeddings", RERANK: "reranks documents"}
    assert model.task is not None
    message = f"the model `{model.name}` {does[model.task]}, not what {_ROUTES[task]} need: use {_ROUTES[model.task]}"
    if task == EMBED:
        message += " (embeddings need an embedding model: tricklm serve --model all-MiniLM-L6-v2, or a "
        message += "sentence-transformers folder)"
    code = {GENERATE: "model_not_generative", EMBED: "model_not_embedding", RERANK: "model_not_reranker"}[task]
    return APIError(400, message, param="model", code=code)


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
