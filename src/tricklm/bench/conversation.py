"""Multi-turn chat: each conversation sends its whole history every turn (a shared system prompt, then
its user turns and the server's own answers), as chat clients do. With a prefix cache, a turn after the
first should start about as fast as a short prompt; without one it prefills the whole history again.

`num` conversations run at most `max_concurrency` at a time; a conversation's turns run one after another.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from tricklm.bench.client import Messages, Target, send_request
from tricklm.bench.metrics import RequestRecord
from tricklm.bench.workload import random_words


@dataclass(frozen=True)
class Conversation:
    system: str  # the same for every conversation of a run ("" for none)
    user_turns: tuple[str, ...]


def make_conversations(
    num: int, turns: int, input_len: int, system_len: int, seed: int = 0, tokens_per_word: float = 1.0
) -> list[Conversation]:
    """`num` conversations of `turns` user messages of ~`input_len` tokens after one shared system prompt
    of ~`system_len` tokens."""
    rng = random.Random(seed)
    words = lambda n: random_words(rng, max(1, round(n / tokens_per_word)))  # noqa: E731
    system = words(system_len) if system_len else ""
    return [Conversation(system, tuple(words(input_len) for _ in range(turns))) for _ in range(num)]


async def run_conversations(
    client: httpx.AsyncClient,
    target: Target,
    conversations: list[Conversation],
    max_concurrency: int | None,
    on_done: Callable[[], object] = lambda: None,
) -> list[RequestRecord]:
    """Every turn of every conversation, as records numbered conversation by conversation."""
    gate = asyncio.Semaphore(max_concurrency or len(conversations) or 1)

    async def one(number: int, conversation: Conversation) -> list[RequestRecord]:
        records = []
        messages: Messages = [{"role": "system", "content": conversation.system}] if conversation.system else []
        async with gate:
            for turn, user in enumerate(conversation.user_turns, start=1):
                messages.append({"role": "user", "content": user})
                index = number * len(conversation.user_turns) + turn - 1
                record = await send_request(client, target, list(messages), index)
                record.turn = turn
                records.append(record)
                on_done()
                messages.append({"role": "assistant", "content": record.text})
        return records

    per_conversation = await asyncio.gather(*(one(i, c) for i, c in enumerate(conversations)))
    return [r for records in per_conversation for r in records]
