"""Checks every request body before any route sees it: size, UTF-8, JSON that Python could not serve.

`json.loads` accepts what later breaks a handler: `NaN` and `Infinity` (not JSON, and a float that
JSON cannot carry back in an error), lone surrogates such as "\\ud800" (valid JSON escapes, but no
string a tokenizer or an encoder takes), nesting deep enough to exhaust the stack, and integers of
thousands of digits. Each is refused here with a 400 that names the field, in the route's error shape.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tricklm.server.errors import APIError, error_response

# A body past the limit is read on and thrown away, up to this much more, before the 413 is sent: answering while the
# client still sends makes the kernel reset the connection, and the client sees a reset instead of the answer.
# Past it, the connection is closed mid-body (a client sending that much is not waiting to read).
DRAIN_BYTES = 64 * 1024 * 1024

# Messages nest ~6 deep; a JSON schema in response_format or a tool's parameters nests deeper (each
# object level is two: "properties", then the property). Deeper bodies are refused where a walk is needed
# anyway, and at any depth where json.loads itself runs out of stack.
MAX_DEPTH = 64


class _NonFinite:
    def __init__(self, text: str) -> None:
        self.text = text


class _Hooks:
    """json.loads hooks that turn NaN, Infinity and 1e999 into markers, and remember seeing one."""

    def __init__(self) -> None:
        self.saw_non_finite = False

    def parse_float(self, text: str) -> float | _NonFinite:
        value = float(text)
        if math.isfinite(value):
            return value
        self.saw_non_finite = True
        return _NonFinite(text)

    def parse_constant(self, text: str) -> _NonFinite:
        self.saw_non_finite = True
        return _NonFinite(text)


# Only a \uD800-\uDFFF escape can make a lone surrogate (raw surrogate bytes are not UTF-8 at all): a
# high one not followed by a low one, or a low one not after a high one. A pair is one character.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


class BodyGuard:
    """ASGI middleware: reads the body (at most `max_bytes`), checks it, then hands it on unchanged."""

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout  # a body trickled in slower than this is refused (slowloris)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.body_timeout):
                body, more, gone = await read_body(receive, self.max_bytes)
        except TimeoutError:
            await error_response(scope["path"], _too_slow(self.body_timeout))(scope, receive, send)
            return
        if gone:
            return  # the client left before sending its body: nobody to answer
        error = too_large(self.max_bytes) if more else check_content_type(scope, body) or check_body(body)
        if error is not None:
            await error_response(scope["path"], error)(scope, receive, send)
            return
        await self.app(scope, replay_body(body, receive), send)


async def read_body(receive: Receive, max_bytes: int) -> tuple[bytes, bool, bool]:
    """The body, whether it went on past `max_bytes` (the rest is read and dropped, up to DRAIN_BYTES), whether
    the client left. The one reading of a request body: the single server's guard and the replica gateway."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"", False, True
        chunk = message.get("body", b"")
        size += len(chunk)
        more = message.get("more_body", False)
        if size > max_bytes:
            return b"", True, more and await _drain(receive, DRAIN_BYTES)
        chunks.append(chunk)
        if not more:
            return b"".join(chunks), False, False


async def _drain(receive: Receive, budget: int) -> bool:
    """Reads and drops the rest of a body, up to `budget` bytes; True if the client left meanwhile."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return True
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return False
    return False


def too_large(max_bytes: int) -> APIError:
    # what is left of a body past DRAIN_BYTES is not read: the connection must not be reused
    message = f"the request body is larger than this server accepts ({max_bytes} bytes)"
    return APIError(413, message, code="too_large", headers={"connection": "close"})


def _too_slow(seconds: float | None) -> APIError:
    # The rest of the body is not read: the connection must not be reused
    message = f"the request body did not arrive within {seconds:g} s"
    return APIError(408, message, code="timeout", headers={"connection": "close"})


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands over `body` whole, then defers to `receive` (which reports the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would

    return replay


def check_content_type(scope: Scope, body: bytes) -> APIError | None:
    """A 415 for a body sent as anything but JSON in UTF-8 (a form, text, XML, or no type at all)."""
    if not body:
        return None  # nothing to misread; the route says what it misses
    header = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
    media_type, _, params = header.partition(";")
    media_type = media_type.strip().lower()
    charset = next((p.split("=", 1)[1].strip(' "').lower() for p in params.split(";") if "charset=" in p), "utf-8")
    if (media_type == "application/json" or media_type.endswith("+json")) and charset in ("utf-8", "utf8"):
        return None
    sent = header.strip() or "no Content-Type"
    message = f"send the request body as JSON in UTF-8 with 'Content-Type: application/json' (got {sent})"
    return APIError(415, message, code="unsupported_media_type")


def check_body(body: bytes) -> APIError | None:
    """A 400 for a body that is not UTF-8, or JSON that no route could handle safely; None if fine.

    A body that is not JSON at all passes: the route's own parser says so in its usual words.
    """
    if not body:
        return None
    if body.startswith(b"\xef\xbb\xbf") or json.detect_encoding(body) != "utf-8":
        # Starlette's parser would take UTF-16 or a BOM, unchecked by everything below
        message = "the request body must be JSON in UTF-8, without a byte-order mark"
        return APIError(400, message, code="invalid_encoding")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return APIError(400, f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding")
    hooks = _Hooks()
    try:
        data = json.loads(text, parse_float=hooks.parse_float, parse_constant=hooks.parse_constant)
    except RecursionError:
        return _nested()
    except json.JSONDecodeError:
        return None
    except ValueError as e:  # an integer of more digits than Python converts
        return APIError(400, f"the request body has a number that cannot be read: {e}", code="invalid_value")
    if hooks.saw_non_finite or _LONE_SURROGATE.search(body):
        return _walk(data)  # something to find: walk for its path (the common body skips this)
    return None


def _nested() -> APIError:
    return APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep", code="invalid_value")


def _walk(data: Any) -> APIError | None:
    """Breadth-first, without recursion, so no depth can overflow the stack; paths are built only for
    containers and for the value at fault, so a list of 100,000 token ids costs one pass of type checks."""
    level: list[tuple[str, Any]] = [("", data)]
    for _ in range(MAX_DEPTH + 1):
        below: list[tuple[str, Any]] = []
        for path, value in level:
            error = _check_container(path, value, below) if isinstance(value, dict | list) else _check(path, value)
            if error is not None:
                return error
        if not below:
            return None
        level = below
    return _nested()


def _check_container(path: str, value: dict[str, Any] | list[Any], below: list[tuple[str, Any]]) -> APIError | None:
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(key, str) and not _is_unicode(key):
            where = path or "body"
            return APIError(400, f"a field name in '{where}' contains a lone surrogate", param=path or None)
        if isinstance(item, int | bool | None):
            continue
        item_path = f"{path}.{key}" if path else str(key)
        if isinstance(item, dict | list):
            below.append((item_path, item))
        elif (error := _check(item_path, item)) is not None:
            return error
    return None


def _check(path: str, value: Any) -> APIError | None:
    if isinstance(value, _NonFinite):
        return APIError(400, f"invalid value for '{path}': {value.text} is not a finite number", param=path)
    if isinstance(value, str) and not _is_unicode(value):
        return APIError(400, f"'{path or 'body'}' contains a lone surrogate (not valid Unicode)", param=path or None)
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
