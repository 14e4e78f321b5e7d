"""One access line per request: its id, status, token counts, time to first token and duration, never text.

The id is the client's `X-Request-Id` if it sent a sane one, else a new one; it is echoed in the response
headers. The engine requests a route starts register their output processors with the line of the HTTP
request they serve (`record_processor`, through a context variable that the route's tasks inherit), so
the line can count tokens without any route having to report them. uvicorn's own access log says less
(no id, no tokens, nothing for streams beyond the status) and can be turned off.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tricklm.engine.output import OutputProcessor
from tricklm.server.access import adding_headers

logger = logging.getLogger("tricklm.access")

HEADER = b"x-request-id"
QUIET_PATHS = frozenset({"/health"})  # probed every few seconds: a line each would drown the rest
# A client's id is used as is only if it is short and plain: it goes into logs and headers
_SANE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass
class AccessRecord:
    request_id: str
    start: float = field(default_factory=time.monotonic)
    processors: list[OutputProcessor] = field(default_factory=list)

    def line(self, method: str, path: str, status: int) -> str:
        prompt = sum(p.num_prompt_tokens for p in self.processors)
        output = sum(len(p.token_ids) for p in self.processors)
        firsts = [p.timings.first_token for p in self.processors if p.timings.first_token is not None]
        ttft = f"{1000 * (min(firsts) - self.start):.0f}ms" if firsts else "-"
        took = 1000 * (time.monotonic() - self.start)
        return (
            f"{self.request_id} {method} {path} {status} prompt_tokens={prompt} output_tokens={output} "
            f"ttft={ttft} duration={took:.0f}ms"
        )


_current: contextvars.ContextVar[AccessRecord | None] = contextvars.ContextVar("tricklm_access", default=None)


def record_processor(processor: OutputProcessor) -> None:
    """Count `processor`'s tokens in the access line of the HTTP request being served, if any."""
    record = _current.get()
    if record is not None:
        record.processors.append(processor)


class AccessLog:
    """ASGI middleware: the request id (taken or made, echoed), then one log line when the response ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER, b"")
        request_id = given.decode() if _SANE_ID.match(given) else uuid.uuid4().hex
        record = AccessRecord(request_id)
        token = _current.set(record)
        status = 500  # if the app fails before it answers at all
        send_with_id = adding_headers(send, [(HEADER, request_id.encode())])

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send_with_id(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            _current.reset(token)
            if scope["path"] not in QUIET_PATHS:
                logger.info("%s", record.line(scope["method"], scope["path"], status))
