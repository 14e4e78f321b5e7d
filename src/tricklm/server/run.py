"""Run the HTTP server: resolve the model up front (one clear error line), load it while serving /health."""

from __future__ import annotations

import logging
import threading

import uvicorn

from tricklm.config import EngineConfig, ServerConfig
from tricklm.engine.engine import Engine
from tricklm.memory import limit_fragmentation
from tricklm.model.resolve import resolve_model
from tricklm.server.access import is_loopback
from tricklm.server.app import create_app

logger = logging.getLogger("tricklm")


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    limit_fragmentation()
    if not server_config.api_keys and not is_loopback(server_config.host):
        logger.warning(
            "tricklm: serving on %s without an API key: anyone who can reach the port can use the model "
            "(--api-key KEY, --api-key-file FILE or TRICKLM_API_KEY)",
            server_config.host,
        )
    resolve_model(engine_config.model)  # converts a GGUF on first use, with a progress bar; raises ModelLoadError
    failed = threading.Event()
    server: uvicorn.Server | None = None

    def factory() -> Engine:
        try:
            return Engine(engine_config, progress=False)
        except Exception as e:
            logger.error("tricklm: error: %s", e)
            failed.set()
            if server is not None:
                server.should_exit = True
            raise

    app = create_app(
        engine_factory=factory,
        served_model_name=server_config.served_model_name,
        max_request_bytes=server_config.max_request_bytes,
        api_keys=server_config.api_keys,
        allowed_origins=server_config.allowed_origins,
        metrics_public=server_config.metrics_public,
    )
    config = uvicorn.Config(
        app, host=server_config.host, port=server_config.port, log_level=server_config.log_level, timeout_keep_alive=30
    )
    server = uvicorn.Server(config)
    server.run()
    return 1 if failed.is_set() else 0
