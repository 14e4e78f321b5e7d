"""A cheap length check on prompt text that needs no tokenizer (EngineClient runs it before tokenizing).

Tokenizing or rendering a template of megabytes takes seconds; done on the event loop, every other
client (and /health) would wait. The check refuses, before any tokenizing, a text too long to fit the
context window whatever its tokens: no token covers more characters than its vocabulary string has.
"""

from __future__ import annotations

from tricklm.engine.engine import Engine
from tricklm.server.errors import APIError


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
