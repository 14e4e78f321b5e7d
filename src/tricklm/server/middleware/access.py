"""Who may call the server: API keys on every route but /health and the chat page, CORS closed by default.

vLLM protects only /v1/*; here /generate, /tokenize, /detokenize, /metrics and the API docs need the key
too (`--metrics-public` opens /metrics for a scraper on a private network). Keys are compared in
constant time and never logged. CORS is same-origin unless `--allowed-origins` names origins (or `*`);
credentials (cookies) are never allowed; preflight requests are answered before the key is checked, as
browsers send them without one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tricklm.server.errors import APIError, error_response

logger = logging.getLogger(__name__)

KEY_ENV = "TRICKLM_API_KEY"
# Reachable without a key: the load balancer's probe and the chat page (which then asks for one) with its
# icon and static files (its script, styles and vendored libraries: nothing private)
OPEN_PATHS = frozenset({"/health", "/", "/favicon.ico"})
OPEN_PREFIX = "/static/"
# Sent with every response: the page and the docs are never framed, and no response is content-sniffed
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
]
# The chat page's own policy: scripts and styles from its own files only (nothing inline, so HTML that
# slipped past the sanitiser still could not run), and it talks to its own origin only
PAGE_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def read_keys(keys: Sequence[str], key_file: Path | None) -> tuple[str, ...]:
    """The keys from the command line, a file (one per line, # comments) and TRICKLM_API_KEY."""
    found = [k for k in keys if k]
    if key_file is not None:
        try:
            lines = key_file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"--api-key-file {key_file}: {e.strerror or e}") from None
        found += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        found.append(env)
    if any(len(k) < 8 or not all(c.isascii() and c.isprintable() and not c.isspace() for c in k) for k in found):
        raise ValueError("API keys must be at least 8 printable ASCII characters, without spaces")
    return tuple(dict.fromkeys(found))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class KeyGuard:
    """ASGI middleware: a request without a valid `Authorization: Bearer KEY` (or `x-api-key: KEY`, as
    Anthropic's clients send it) gets a 401."""

    def __init__(self, app: ASGIApp, keys: Sequence[str], metrics_public: bool = False) -> None:
        self.app = app
        # Digests, compared in constant time: neither a key's content nor its length shows in the timing
        self.keys = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.open = OPEN_PATHS | ({"/metrics"} if metrics_public else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.allows(scope):
            await self.app(scope, receive, send)
            return
        await error_response(scope["path"], self.refusal())(scope, receive, send)

    def allows(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        is_open = path in self.open or path.startswith(OPEN_PREFIX)
        return not self.keys or is_open or self._authorized(scope)

    @staticmethod
    def refusal() -> APIError:
        return APIError(
            401,
            "a valid API key is required: send it as 'Authorization: Bearer KEY' (or 'x-api-key: KEY')",
            "invalid_request_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # Anthropic's clients send the key as `x-api-key` (or as a Bearer token): either may carry it
        tokens = [t.strip() for t in (token if scheme.lower() == b"bearer" else b"", headers.get(b"x-api-key", b""))]
        digests = [hashlib.sha256(t).digest() for t in tokens if t]
        # Every key is compared, so which one matched does not show either
        matches = [hmac.compare_digest(digest, key) for digest in digests for key in self.keys]
        return any(matches)


class SecurityHeaders:
    """ASGI middleware: SECURITY_HEADERS on every response, PAGE_POLICY on the chat page's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = scope["path"] == "/"

        extra = [*SECURITY_HEADERS, *([(b"content-security-policy", PAGE_POLICY)] if page else [])]
        await self.app(scope, receive, adding_headers(send, extra))


def adding_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    """`send`, with `headers` appended to the response's start."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await send(message)

    return send_with_headers


def cors_options(origins: Sequence[str]) -> dict[str, object] | None:
    """CORSMiddleware's options for `--allowed-origins`, or None (no CORS headers: same-origin only)."""
    if not origins:
        return None
    wildcard = "*" in origins
    return {
        "allow_origins": ["*"] if wildcard else list(origins),
        "allow_credentials": False,  # keys travel as Bearer headers: no cookie ever needs to ride along
        "allow_methods": ["GET", "POST", "OPTIONS"],
        "allow_headers": ["Authorization", "Content-Type", "X-Request-Id"],
        "max_age": 600,
    }
