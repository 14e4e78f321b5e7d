"""tricklm on Ray Serve: N engine replicas behind one endpoint, for when one machine's cores are not enough.

Two deployments. `EngineReplica` holds one engine and the whole tricklm app (every route, unchanged), and
answers requests handed to it as plain data, streaming the response back message by message. `Gateway` is
what Ray's HTTP proxy calls: it reads the body, extracts the prompt's prefix for the router
(`ray_router.PrefixAffinityRouter`, `routing.py`), relays the chosen replica's response as it comes, and
answers /health and /metrics for all replicas at once from what each replica posts to a `ReplicaBoard`.

A replica that dies before answering costs its requests nothing: the gateway sends them to another. One
that dies in the middle of a stream ends that stream with an error event; Ray starts a new replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shlex
import signal
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message, Receive

from tricklm.config import EngineConfig, ReplicaPlan, ServerConfig
from tricklm.engine.engine import Engine
from tricklm.model.resolve import resolve_model
from tricklm.server.app import create_app
from tricklm.server.errors import APIError, error_response, overloaded
from tricklm.server.middleware.access import KeyGuard
from tricklm.server.middleware.body_guard import read_body, replay_body, too_large
from tricklm.server.replicas.metrics_merge import merge_expositions
from tricklm.server.replicas.router import PrefixAffinityRouter
from tricklm.server.replicas.routing import chunk_hashes, routing_text
from tricklm.server.sse import DONE, sse_event

logger = logging.getLogger("tricklm.replicas")

# Ray's overloads of `serve.deployment` defeat mypy: called with options only, it returns the decorator
_deployment: Any = serve.deployment

POST_INTERVAL = 1.0  # seconds between a replica's posts of its health and metrics
STALE_AFTER = 4.0  # a replica silent this long is taken as gone (dead, or stuck in a step)
ATTEMPTS = 3  # replicas tried for a request whose replica died before answering


@dataclass(frozen=True)
class Forwarded:
    """An HTTP request as plain data, for the trip from the gateway to a replica."""

    method: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class ReplicaPost:
    replica: str
    healthy: bool
    metrics: str
    at: float


class _Board:
    """Where replicas post their health and metrics each second, for the gateway to read in one call."""

    def __init__(self) -> None:
        self.posts: dict[str, ReplicaPost] = {}

    def post(self, entry: ReplicaPost) -> None:
        self.posts[entry.replica] = entry

    def read(self, max_age: float) -> list[ReplicaPost]:
        now = time.time()
        self.posts = {k: p for k, p in self.posts.items() if now - p.at <= max_age}
        return sorted(self.posts.values(), key=lambda p: p.replica)


ReplicaBoard: Any = ray.remote(num_cpus=0)(_Board)


def _board() -> Any:
    """The board, created by whichever deployment starts first. Detached: a gateway or replica that dies
    must not take the others' board with it (entries of replicas gone expire by age)."""
    return ReplicaBoard.options(
        name="tricklm-board", namespace="tricklm", get_if_exists=True, lifetime="detached"
    ).remote()


class EngineReplica:
    """One engine and the tricklm app around it, fed requests by the gateway."""

    # Ray awaits an async constructor: the replica takes no request until the engine is loaded
    async def __init__(  # type: ignore[misc]
        self, engine_config: EngineConfig, server_config: ServerConfig
    ) -> None:
        from tricklm.logs import configure_logging

        configure_logging(server_config.log_format, server_config.log_level)
        engine = await asyncio.to_thread(Engine, engine_config, False)
        self.engine = engine
        self.app = create_app(server_config, engine=engine)
        self._lifespan = AsyncExitStack()
        await self._lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        self.name = serve.get_replica_context().replica_id.unique_id
        self.board = _board()
        self._apps: set[asyncio.Task[None]] = set()
        self._poster = asyncio.create_task(self._post_forever(), name="tricklm-board")

    async def forward(self, request: Forwarded, prefix: Sequence[int] = ()) -> AsyncIterator[ResponseStart | bytes]:
        """Run the request through the app; yield the response's start, then its body as the app sends it."""
        del prefix  # the router's, not ours
        messages: asyncio.Queue[Message | None] = asyncio.Queue()
        left = asyncio.Event()
        task = asyncio.create_task(self.app(_scope(request), _receiver(request.body, left), messages.put))
        self._apps.add(task)
        task.add_done_callback(self._apps.discard)
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    headers = [*message.get("headers", []), (b"x-tricklm-replica", self.name.encode())]
                    yield ResponseStart(message["status"], headers)
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield bytes(message["body"])
                    if not message.get("more_body", False):
                        break
        finally:
            # The gateway stopped reading (its client left, or the stream ended): the app sees a
            # disconnect and aborts the request in the engine, as a direct client's leaving would
            left.set()

    def check_health(self) -> None:
        code, body = self.app.state.server.health()
        if code != 200 and body.get("status") != "restarting":
            raise RuntimeError(f"replica unhealthy: {body}")

    async def _post_forever(self) -> None:
        state = self.app.state.server
        while True:
            code, _ = state.health()
            text = state.metrics.render().decode()
            self.board.post.remote(ReplicaPost(self.name, code == 200, text, time.time()))
            await asyncio.sleep(POST_INTERVAL)

    async def __del__(self) -> None:
        self._poster.cancel()
        await self._lifespan.aclose()
        self.engine.shutdown()


def _scope(request: Forwarded) -> dict[str, Any]:
    return {
        "type": "http",
        # 2.3: the app learns of a disconnect from `receive`, which is how `forward` tells it
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.raw_path,
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": request.client,
        "server": None,
        "state": {},
    }


def _receiver(body: bytes, left: asyncio.Event) -> Receive:
    async def disconnect() -> Message:
        await left.wait()
        return {"type": "http.disconnect"}

    return replay_body(body, disconnect)


class Gateway:
    """What Ray's HTTP proxy calls: relays each request to a replica, answers /health and /metrics itself."""

    def __init__(self, engines: Any, server_config: ServerConfig) -> None:
        self.engines = engines
        self.board = _board()
        self.max_request_bytes = server_config.max_request_bytes
        self.guard = KeyGuard(_refuse, server_config.api_keys, server_config.metrics_public)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path == "/health":
            return await self._health()
        if path == "/metrics":
            if not self.guard.allows(request.scope):
                return error_response(path, self.guard.refusal())
            return await self._metrics()
        # Keys of relayed requests are checked by the replica's app, after CORS (a browser's preflight
        # carries no key)
        # the single server's reading and limit, so that a client gets the same answer with or without replicas
        body, more, gone = await read_body(request.receive, self.max_request_bytes)
        if gone:  # the client left mid-body: nothing to relay, nobody to answer
            return Response(status_code=499)
        if more:
            return error_response(path, too_large(self.max_request_bytes))
        forwarded = Forwarded(
            method=request.method,
            path=path,
            raw_path=request.scope.get("raw_path") or path.encode(),
            query_string=request.scope.get("query_string", b""),
            headers=list(request.scope["headers"]),
            body=body,
            client=request.scope.get("client"),
        )
        return await self._relay(forwarded, chunk_hashes(routing_text(path, body)))

    async def _relay(self, request: Forwarded, prefix: list[int]) -> Response:
        for attempt in range(ATTEMPTS):
            stream = self.engines.options(stream=True).forward.remote(request, prefix=prefix)
            try:
                start = await stream.__anext__()
            except BackPressureError:
                return error_response(request.path, overloaded("every replica's queue is full; retry shortly"))
            except StopAsyncIteration:  # the app ended without a response: a bug there, answered as one
                error = APIError(502, "the replica ended without a response", "server_error", code="no_response")
                return error_response(request.path, error)
            except RayActorError as e:
                # Died before it answered: nothing was generated for this client, so another replica may
                logger.warning("replica lost before answering (attempt %d): %s", attempt + 1, type(e).__name__)
                stream.cancel()
                continue
            response = StreamingResponse(_rest(stream, start, request.path), status_code=start.status)
            # Ray's proxy adds the request's id itself (the app took the same id from the request)
            response.raw_headers = [(k, v) for k, v in start.headers if k.lower() != b"x-request-id"]
            return response
        error = APIError(503, "no replica could take the request", "server_error", code="replica_unavailable")
        return error_response(request.path, error)

    async def _health(self) -> Response:
        posts = await self.board.read.remote(STALE_AFTER)
        serving = [p.replica for p in posts if p.healthy]
        if serving:
            return JSONResponse({"status": "ok", "replicas": len(serving)})
        return JSONResponse({"status": "unavailable", "detail": "no replica is serving"}, status_code=503)

    async def _metrics(self) -> Response:
        posts = await self.board.read.remote(STALE_AFTER)
        page = merge_expositions((p.replica, p.metrics) for p in posts)
        return Response(page, media_type="text/plain; version=0.0.4")


async def _refuse(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the gateway's key guard only checks; it never passes requests on")


async def _rest(stream: Any, start: ResponseStart, path: str) -> AsyncIterator[bytes]:
    """The body after the start; a replica that dies mid-stream ends an event stream with an error event."""
    try:
        async for chunk in stream:
            yield chunk
    except RayActorError:
        logger.warning("replica lost in the middle of a response to %s", path)
        if _is_event_stream(start):
            error = APIError(502, "the replica serving this request stopped", "server_error", code="replica_died")
            yield sse_event(error.body())
            yield DONE
    finally:
        stream.cancel()


def _is_event_stream(start: ResponseStart) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start.headers)


def build_application(engine_config: EngineConfig, server_config: ServerConfig, plan: ReplicaPlan) -> Any:
    """The Serve application: the gateway bound to `plan.replicas` engines of `plan.cpus_per_replica` CPUs."""
    engine_config = dataclasses.replace(engine_config, num_threads=plan.cpus_per_replica)
    engines = _deployment(
        name="EngineReplica",
        num_replicas=plan.replicas,
        ray_actor_options={"num_cpus": plan.cpus_per_replica},
        # Ray's default (5) would cap a replica's batch. Past its batch and queue a replica answers 429
        # itself (with Retry-After), as one server does; the slack lets it see those requests to refuse them
        max_ongoing_requests=2 * engine_config.max_num_seqs + engine_config.max_queue,
        # A burst waits here while the router picks replicas; Ray answers 429 past this bound
        max_queued_requests=plan.replicas * (engine_config.max_num_seqs + engine_config.max_queue),
        request_router_config={
            "request_router_class": f"{PrefixAffinityRouter.__module__}.{PrefixAffinityRouter.__name__}",
            "request_router_kwargs": {"busy_at": engine_config.max_num_seqs},
        },
        health_check_period_s=2.0,
    )(EngineReplica).bind(engine_config, server_config)
    gateway = _deployment(name="Gateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000)
    return gateway(Gateway).bind(engines, server_config)


def from_args(args: dict[str, str]) -> Any:
    """Ray Serve application builder, for `serve run` and KubeRay's `serveConfigV2`: `args["argv"]` holds
    `tricklm serve`'s options (--replicas, --cpus-per-replica, --model, ...) as one string."""
    from tricklm.options import replica_setup

    engine_config, server_config, plan = replica_setup(shlex.split(args.get("argv", "")))
    return build_application(engine_config, server_config, plan)


def serve_replicas(engine_config: EngineConfig, server_config: ServerConfig, plan: ReplicaPlan) -> int:
    """Start (or join) Ray, deploy, and serve until SIGINT/SIGTERM."""
    resolve_model(engine_config.model)  # a bad --model is one line here, not N replicas failing to start
    if plan.ray_address is None:
        cores = os.cpu_count() or 1
        wanted = plan.replicas * plan.cpus_per_replica
        if wanted > cores:
            logger.warning(
                "%d replicas x %d CPUs oversubscribe this machine's %d cores",
                plan.replicas,
                plan.cpus_per_replica,
                cores,
            )
        ray.init(num_cpus=max(cores, wanted), include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES)
    else:
        ray.init(address=plan.ray_address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": server_config.host, "port": server_config.port})
        serve.run(build_application(engine_config, server_config, plan), name="tricklm", route_prefix="/")
        logger.info("serving %d replicas on http://%s:%d", plan.replicas, server_config.host, server_config.port)
        stop.wait()
        logger.info("shutting down the replicas")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


OBJECT_STORE_BYTES = 256 << 20  # responses pass through it a message at a time: Ray's 30% of RAM is far more
