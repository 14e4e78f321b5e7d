"""One access line per request: its id, status, token counts, time to first token and duration; the
prompt and output text only when asked for (`log_requests`), since they are the users' data.

The id is the client's `X-Request-Id` if it sent a sane one, else a new one; it is echoed in the response
headers. The engine requests a route starts are registered with the line of the HTTP request they serve
(`record_stream`, through a context variable that the route's tasks inherit), so the line can count
tokens without any route having to report them. uvicorn's own access log says less (no id, no tokens,
nothing for streams beyond the status), so `serve` turns it off.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tricklm.engine.async_llm import RequestStream
from tricklm.server.middleware.access import adding_headers

logger = logging.getLogger("tricklm.access")

HEADER = b"x-request-id"
# uvicorn hands over the path percent-decoded: re-encoded for the text line, so that "%0d%0a" in a URL
# cannot start a forged line of its own
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
QUIET_PATHS = frozenset({"/health"})  # probed every few seconds: a line each would drown the rest
# A client's id is used as is only if it is short and plain: it goes into logs and headers
_SANE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass
class AccessRecord:
    request_id: str
    start: float = field(default_factory=time.monotonic)
    streams: list[RequestStream] = field(default_factory=list)

    def fields(self, method: str, path: str, status: int, with_text: bool) -> dict[str, Any]:
        processors = [s.processor for s in self.streams]
        firsts = [p.timings.first_token for p in processors if p.timings.first_token is not None]
        entry: dict[str, Any] = {
            "request_id": self.request_id,
            "method": method,
            "path": path,
            "status": status,
            "prompt_tokens": sum(p.num_prompt_tokens for p in processors),
            "output_tokens": sum(len(p.token_ids) for p in processors),
            "ttft_ms": round(1000 * (min(firsts) - self.start)) if firsts else None,
            "duration_ms": round(1000 * (time.monotonic() - self.start)),
        }
        if with_text and self.streams:
            entry["prompts"] = [s.prompt_text for s in self.streams]
            entry["outputs"] = [p.text for p in processors]
        return entry


def access_line(fields: dict[str, Any]) -> str:
    """The text form: the fixed fields in order, then the texts (if logged) as JSON strings."""
    ttft = "-" if fields["ttft_ms"] is None else f"{fields['ttft_ms']}ms"
    line = (
        f"{fields['request_id']} {fields['method']} {quote(fields['path'], safe=_PATH_SAFE)} {fields['status']} "
        f"prompt_tokens={fields['prompt_tokens']} output_tokens={fields['output_tokens']} "
        f"ttft={ttft} duration={fields['duration_ms']}ms"
    )
    for key in ("prompts", "outputs"):
        if key in fields:
            line += f" {key}={json.dumps(fields[key], ensure_ascii=False)}"
    return line


_current: contextvars.ContextVar[AccessRecord | None] = contextvars.ContextVar("tricklm_access", default=None)


def record_stream(stream: RequestStream) -> None:
    """Count `stream`'s tokens in the access line of the HTTP request being served, if any."""
    record = _current.get()
    if record is not None:
        record.streams.append(stream)


class AccessLog:
    """ASGI middleware: the request id (taken or made, echoed), then one log line when the response ends."""

    def __init__(self, app: ASGIApp, log_requests: bool = False) -> None:
        self.app = app
        self.log_requests = log_requests

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
                fields = record.fields(scope["method"], scope["path"], status, self.log_requests)
                logger.info("%s", access_line(fields), extra={"fields": fields})
