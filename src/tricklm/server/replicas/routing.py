"""Which replica should take a request: the one that already holds its prompt's prefix, unless that one is busy.

The gateway reads a request's prompt as text (no tokenizer there: the gateway stays light); the router cuts
it into fixed chunks and chains their hashes, as the engine's prefix cache chains block hashes. It
remembers, per chunk hash, which replicas were sent prompts with that prefix. A new request goes to the
replica that matches the most leading chunks; a conversation's next turn starts with the whole previous
turn, so it lands where that turn's KV cache still is, and requests that share a system prompt meet on one
replica. A replica is passed over while it already runs a full batch; then the least loaded one takes the
request and learns the prefix too, so a popular prefix spreads over as many replicas as its load needs.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

CHUNK_CHARS = 128  # prefixes shorter than this do not attract: a shared "You are a helpful assistant." is noise
MAX_KEY_CHARS = 64 * CHUNK_CHARS  # past 8 KiB of shared text the choice is made already
REMEMBERED_CHUNKS = 100_000  # chunk hashes kept, least recently routed forgotten first


def routing_text(path: str, body: bytes) -> str:
    """The prompt of an OpenAI or /generate request as one string (empty when there is none to route by)."""
    if not body or path not in _PROMPT_FIELDS:
        return ""
    try:
        # The whole body (bounded by --max-request-bytes): a cut one would not parse, and long
        # conversations are the ones whose cache is worth finding
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""  # the replica answers the parse error; any replica will do
    if not isinstance(payload, dict):
        return ""
    return _flatten(payload.get(_PROMPT_FIELDS[path]))[:MAX_KEY_CHARS]


_PROMPT_FIELDS = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/messages": "messages",
    "/v1/responses": "input",
    "/generate": "prompt",
}
_PROMPT_FIELDS |= {path.removeprefix("/v1"): field for path, field in _PROMPT_FIELDS.items() if path.startswith("/v1/")}


def _flatten(value: Any) -> str:
    """Messages, content parts, strings and token lists, in order, with role markers between messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value},"
    if isinstance(value, list):
        return "".join(_flatten(item) for item in value)
    if isinstance(value, dict):
        if "role" in value:
            return f"\x00{value.get('role')}\x00{_flatten(value.get('content'))}"
        text = value.get("text")
        return text if isinstance(text, str) else ""
    return ""


def chunk_hashes(text: str, chunk_chars: int = CHUNK_CHARS) -> list[int]:
    """Hashes of each complete leading chunk, each covering all text before it."""
    hashes: list[int] = []
    previous = 0
    for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
        previous = hash((previous, text[start : start + chunk_chars]))
        hashes.append(previous)
    return hashes


class PrefixIndex:
    """Chunk hash -> the replicas sent a prompt with that prefix; bounded, least recently used out first."""

    def __init__(self, capacity: int = REMEMBERED_CHUNKS) -> None:
        self.capacity = capacity
        self._holders: OrderedDict[int, set[str]] = OrderedDict()

    def matches(self, hashes: Sequence[int], replicas: Iterable[str]) -> dict[str, int]:
        """How many leading chunks of the prompt each replica has seen."""
        depth = dict.fromkeys(replicas, 0)
        alive = set(depth)
        for i, h in enumerate(hashes):
            holders = self._holders.get(h)
            alive &= holders if holders is not None else set()
            if not alive:
                break
            for replica in alive:
                depth[replica] = i + 1
        return depth

    def record(self, hashes: Sequence[int], replica: str) -> None:
        for h in hashes:
            holders = self._holders.get(h)
            if holders is None:
                holders = self._holders[h] = set()
            else:
                self._holders.move_to_end(h)
            holders.add(replica)
        while len(self._holders) > self.capacity:
            self._holders.popitem(last=False)

    def forget(self, replica: str) -> None:
        """A replica that died took its cache with it."""
        for h in [h for h, holders in self._holders.items() if replica in holders]:
            holders = self._holders[h]
            holders.discard(replica)
            if not holders:
                del self._holders[h]


def rank_replicas(depth: dict[str, int], load: dict[str, int | None], busy_at: int) -> list[list[str]]:
    """Preference ranks: the deepest-matching replicas that are not busy first, then every replica (the
    router takes the least loaded replica of the first rank that has room).

    `load` is a replica's ongoing requests as last seen (None: unknown, taken as idle).
    """
    everyone = sorted(depth)
    free = [r for r in everyone if (load.get(r) or 0) < busy_at]
    best = max((depth[r] for r in free), default=0)
    if best == 0:
        return [everyone]
    affine = [r for r in free if depth[r] == best]
    rest = [r for r in everyone if r not in affine]
    return [affine, rest] if rest else [affine]
