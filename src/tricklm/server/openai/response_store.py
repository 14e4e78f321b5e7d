"""Stored responses, for the Responses API's `previous_response_id`, `GET` and `DELETE`.

In memory and bounded, as a local server's should be: at most `max_items` responses and `max_bytes` of
them (their JSON), the least recently used evicted first. A response is stored with the conversation
that led to it (without its instructions, which do not carry over, as in OpenAI's API), so that the
next turn can name it instead of sending everything again. Nothing survives a restart; an unknown or
evicted id is a 404 that says so.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from tricklm.server.errors import APIError

MAX_ITEMS = 512
MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class Stored:
    body: dict[str, Any]  # the response as it was returned
    conversation: list[dict[str, Any]]  # chat messages: its input, then its output as the assistant's turn
    nbytes: int


class ResponseStore:
    def __init__(self, max_items: int = MAX_ITEMS, max_bytes: int = MAX_BYTES) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, body: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        # The earlier turns are the stored responses' own message objects, shared, not copied: the body
        # (which holds this turn's output) and the newest input stand for what this entry adds
        nbytes = len(json.dumps(body)) + len(json.dumps(conversation[-2:]))
        if nbytes > self.max_bytes:
            return  # larger than the whole store: kept nowhere, as if evicted at once
        with self._lock:
            self._remove(body["id"])
            self._items[body["id"]] = Stored(body, conversation, nbytes)
            self._bytes += nbytes
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                self._remove(next(iter(self._items)))

    def get(self, response_id: str, param: str = "response_id") -> Stored:
        with self._lock:
            stored = self._items.get(response_id)
            if stored is not None:
                self._items.move_to_end(response_id)
        if stored is None:
            raise not_found(response_id, param)
        return stored

    def delete(self, response_id: str) -> None:
        with self._lock:
            found = self._remove(response_id)
        if not found:
            raise not_found(response_id)

    def _remove(self, response_id: str) -> bool:
        stored = self._items.pop(response_id, None)
        if stored is None:
            return False
        self._bytes -= stored.nbytes
        return True


def not_found(response_id: str, param: str = "response_id") -> APIError:
    message = (
        f"Response with id {response_id!r} not found: it was never stored here, was deleted, or was evicted "
        f"(this server keeps the last {MAX_ITEMS} stored responses, in memory)"
    )
    return APIError(404, message, "invalid_request_error", param=param, code="response_not_found")
