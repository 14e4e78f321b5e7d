"""Prompt text to token ids, off the event loop, after a cheap length check that needs no tokenizer.

Tokenizing or rendering a template of megabytes takes seconds; done on the event loop, every other
client (and /health) would wait. The check refuses, before any tokenizing, a text too long to fit the
context window whatever its tokens: no token covers more characters than its vocabulary string has.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from tricklm.engine.engine import Engine
from tricklm.server.errors import APIError
from tricklm.tokenizer import ChatTemplateError


def check_length(engine: Engine, num_chars: int, param: str) -> None:
    limit = engine.max_model_len * engine.tokenizer.max_token_chars
    if num_chars > limit:
        raise APIError(
            400,
            f"'{param}' is {num_chars} characters long: more than a context of {engine.max_model_len} tokens can "
            f"hold with this tokenizer (at most {limit} characters); please shorten it",
            param=param,
            code="context_length_exceeded",
        )


async def encode_text(engine: Engine, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
    check_length(engine, len(text), param)
    return await run_in_threadpool(engine.tokenizer.encode, text, add_special_tokens)


async def encode_chat(engine: Engine, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
    """The chat rendered by the model's template: its markup as control tokens, the messages' text as text."""
    check_length(engine, sum(len(v) for m in messages for v in m.values() if isinstance(v, str)), "messages")
    try:
        return await run_in_threadpool(engine.tokenizer.encode_chat, messages, add_generation_prompt)
    except (ChatTemplateError, ValueError) as e:
        raise APIError(400, str(e), param="messages", code="chat_template_error") from None
