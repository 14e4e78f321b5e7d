"""Run the app with uvicorn on 127.0.0.1 and a free port, in a background thread (demo, tests, bench)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(app: FastAPI, ready_timeout: float = 120.0, **config: Any) -> Iterator[str]:
    """Yield the base URL once /health answers 200; stop the server on exit. `config`: more uvicorn settings."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, name="tricklm-uvicorn", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, ready_timeout)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_healthy(base: str, timeout: float, is_alive: Callable[[], bool] = lambda: True) -> None:
    """Poll /health until it answers 200; give up after `timeout` or once `is_alive()` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_alive():
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server at {base} did not become healthy within {timeout:.0f}s (or it exited)")
