"""Run the HTTP server: resolve the model up front (one clear error line), load it while serving /health."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from tricklm.config import EngineConfig, ServerConfig
from tricklm.engine.embedder import Embedder, Reranker
from tricklm.engine.engine import Engine
from tricklm.memory import limit_fragmentation
from tricklm.model.bert import encoder_task
from tricklm.model.config import ModelLoadError
from tricklm.model.resolve import model_name, resolve_model
from tricklm.server.app import create_app
from tricklm.server.middleware.access import is_loopback
from tricklm.server.middleware.slow_clients import header_deadline_protocol
from tricklm.server.state import Model, ServerState

logger = logging.getLogger("tricklm")


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    limit_fragmentation()
    if not server_config.api_keys and not is_loopback(server_config.host):
        logger.warning(
            "serving on %s without an API key: anyone who can reach the port can use the model "
            "(--api-key KEY, --api-key-file FILE or TRICKLM_API_KEY)",
            server_config.host,
        )
    specs = [engine_config.model, *server_config.models]
    # converts a GGUF (or unzips a packaged model) on first use, with a progress bar; raises ModelLoadError
    folders = [resolve_model(spec) for spec in specs]
    names = served_names(specs, folders, server_config.served_model_names)
    failed = threading.Event()
    server: uvicorn.Server | None = None
    held: dict[str, int] = {}  # bytes each model loaded so far holds
    engine_config = _share_cores(engine_config, sum(encoder_task(f) is None for f in folders))

    def factory(spec: str | None, folder: Path, name: str) -> Callable[[], Model]:
        def load() -> Model:
            # refused before its weights come in, where its files alone are over the limit
            _check_memory({**held, name: _file_bytes(folder)}, server_config.memory_limit, None)
            model = _load(dataclasses.replace(engine_config, model=spec), folder, name)
            held[name] = model.memory_bytes
            _check_memory(held, server_config.memory_limit, model)
            if len(held) == len(specs) > 1:
                total = ", ".join(f"{n} {b / 2**20:.0f}" for n, b in held.items())
                logger.info("models hold %.0f MiB (%s MiB)", sum(held.values()) / 2**20, total)
            return model

        return load

    def on_load_error(e: Exception) -> None:
        logger.error("tricklm: error: %s", e)
        failed.set()
        if server is not None:
            server.should_exit = True

    loaders = [factory(s, f, n) for s, f, n in zip(specs, folders, names, strict=True)]
    app = create_app(server_config, factories=loaders, names=names, on_load_error=on_load_error)
    config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=server_config.log_level,
        log_config=None,  # uvicorn's records go to our handler, in our format (text or JSON)
        access_log=False,  # ours (access_log.py) says more, in the same line
        http=header_deadline_protocol(server_config.header_timeout),
        timeout_keep_alive=30,
        # A client that stopped reading cannot hold the exit: uvicorn cancels what is left this long after
        # the requests were ended
        timeout_graceful_shutdown=math.ceil(server_config.shutdown_timeout + GRACE_SECONDS),
    )
    server = DrainingServer(config, app.state.server, server_config.shutdown_timeout)
    server.run()
    if server.forced_exit:  # uvicorn finished before the exit thread did: still not through interpreter teardown
        logging.shutdown()
        os._exit(1)
    status = 1 if failed.is_set() else 0
    loading = app.state.server.load_thread
    if loading is not None and loading.is_alive():
        # Stopped before the model was ready. The interpreter's teardown would end the loading thread
        # inside torch's C++ code, which aborts the process ("terminate called without an active
        # exception"); nothing of the load is worth finishing, so leave at once.
        logger.info("stopped while the model was loading")
        logging.shutdown()
        os._exit(status)
    return status


def served_names(specs: list[str | None], folders: list[Path], given: tuple[str, ...]) -> list[str]:
    """Each model's served name: --served-model-name's, in order, else its own; two alike are refused."""
    names = [
        given[i] if i < len(given) else model_name(s, f) for i, (s, f) in enumerate(zip(specs, folders, strict=True))
    ]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two models would be served as {twice[0]}: name them with --served-model-name")
    return names


def _load(config: EngineConfig, folder: Path, name: str) -> Model:
    task = encoder_task(folder)
    if task == "embed":
        return Embedder(folder, name)
    if task == "rerank":
        return Reranker(folder, name)
    return Engine(config, progress=False)


def _share_cores(config: EngineConfig, generating: int) -> EngineConfig:
    """Several generating models share the cores between them unless their threads were chosen: each
    engine's thread has its own OpenMP team, and with more OpenMP threads than cores the runtime stops
    spinning between parallel regions, which made decode steps twice as slow (engine/embedder.py)."""
    if generating < 2 or config.num_threads is not None or config.decode_threads is not None:
        return config
    threads = max(1, (os.cpu_count() or 1) // generating)
    logger.info("%d generating models: %d threads each (--num-threads to choose)", generating, threads)
    return dataclasses.replace(config, num_threads=threads, decode_threads=threads)


def _file_bytes(folder: Path) -> int:
    """The weights' files of a model folder (a converted GGUF's link to its file included)."""
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")]
    return sum(p.resolve().stat().st_size for p in files if p.resolve().is_file())


def _check_memory(held: dict[str, int], limit: int | None, model: Model | None) -> None:
    total = sum(held.values())
    if limit is not None and total > limit:
        if model is not None:
            model.shutdown()
        each = ", ".join(f"{n} {b / 2**20:.0f} MiB" for n, b in held.items())
        raise ModelLoadError(
            f"the models hold {total / 2**20:.0f} MiB ({each}), more than --memory-limit "
            f"{limit / 2**20:.0f} MiB; serve fewer models, or lower --kv-cache-memory or --max-model-len"
        )


SHUTDOWN_MESSAGE = "the server is shutting down"
GRACE_SECONDS = 5.0  # after the drain's requests were ended, for their last events to be written
FORCED_EXIT_MESSAGE = "the server was stopped"
# After a second signal, for the requests' last events: a step in flight ends first (a long prefill chunk of
# a large model takes seconds)
FORCED_EXIT_SECONDS = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn, with a bounded drain: the first signal stops accepting (uvicorn closes its sockets) and
    turns /health and new requests on open connections to 503; requests in flight may finish for
    `timeout` seconds, then each ends with an error (streams: an error event, then [DONE]) so that
    every connection closes and the process exits 0. A second signal ends every request at once
    (streams with their error event and [DONE]) and exits with status 1."""

    def __init__(self, config: uvicorn.Config, state: ServerState, timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.forced_exit = False  # a second signal came: the process ends with status 1, whoever gets there first

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await super().serve(sockets)
        finally:
            if self._deadline is not None:
                self._deadline.cancel()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.forced_exit:  # a third: no more waiting
            os._exit(1)
        if self.state.draining:
            logger.warning("second signal, exiting now")
            self.forced_exit = True
            threading.Thread(target=self._exit_now, name="tricklm-exit", daemon=True).start()
            return
        self.state.draining = True
        logger.info("shutting down; requests in flight have %.0f s to finish", self.timeout)
        if self._loop is not None:
            # Only a wake-up of the event loop here, in the signal handler; the loop sets the deadline
            self._loop.call_soon_threadsafe(self._set_deadline)
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has stopped, so the process would end "killed by
        # SIGTERM"; a drain that finished is a clean exit
        self._captured_signals.clear()

    def _exit_now(self) -> None:
        """Ends every request at the engine's next step, waits (at most FORCED_EXIT_SECONDS) while the event
        loop writes their last events (a stream's error event and [DONE]: a client must not be left with a
        stream cut mid-way), then leaves through os._exit, not interpreter teardown, which a step's native
        threads could still be inside (it ended in SIGABRT)."""
        try:
            for client in self.state.clients():
                client.end_all(FORCED_EXIT_MESSAGE)
            deadline = time.monotonic() + FORCED_EXIT_SECONDS
            while self.server_state.tasks and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            logging.shutdown()
            os._exit(1)

    def _set_deadline(self) -> None:
        assert self._loop is not None
        self._deadline = self._loop.call_later(self.timeout, self._end_requests)

    def _end_requests(self) -> None:
        clients = self.state.clients()
        if clients:
            logger.warning("shutdown timeout reached, ending the requests still in flight")
        for client in clients:
            client.end_all(SHUTDOWN_MESSAGE)
