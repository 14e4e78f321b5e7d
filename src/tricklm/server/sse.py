"""The one SSE encoder, and a streaming response that notices a vanished client even before it writes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# How /openapi.json documents a streamed response: each event, as an SSE parser yields it (a JSON chunk
# in `data`, or the final "[DONE]")
EVENT_STREAM = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "description": "One Server-Sent Event: `data` holds a JSON chunk, or [DONE] at the end",
            "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
            "required": ["data"],
        }
    }
}


def sse_event(payload: dict[str, Any], name: str | None = None) -> bytes:
    """One `data:` event (named, for APIs whose events say their type); compact JSON never contains a raw
    newline, so one line is always enough."""
    data = b"data: " + json.dumps(payload, ensure_ascii=False, separators=(", ", ": ")).encode() + b"\n\n"
    return b"event: " + name.encode() + b"\n" + data if name is not None else data


class SSEResponse(StreamingResponse):
    """Streams `body` and cancels it as soon as the client disconnects.

    Starlette only listens for `http.disconnect` on older ASGI spec versions and otherwise learns of a
    disconnect when a write fails, which never happens while the model is still in prefill. Listening
    ourselves makes the cancel (and so the engine abort) immediate in every phase.
    """

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream_then_stop() -> None:
                # OSError: the socket went away mid-write, which is a disconnect too.
                with contextlib.suppress(OSError):
                    await self.stream_response(send)
                tg.cancel_scope.cancel()

            tg.start_soon(stream_then_stop)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()
