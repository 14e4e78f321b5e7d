"""A cheap length check on prompt text that needs no tokenizer (EngineClient runs it before tokenizing).

Tokenizing or rendering a template of megabytes takes seconds; done on the event loop, every other
client (and /health) would wait. The check refuses, before any tokenizing, a text too long to fit the
context window whatever its tokens: no token covers more characters than its vocabulary string has.
"""

from __future__ import annotations

from tricklm.server.errors import APIError


def check_length(max_model_len: int, max_token_chars: int, num_chars: int, param: str) -> None:
    """Refuses a text of `num_chars` that cannot fit a context of `max_model_len` tokens of at most
    `max_token_chars` characters each."""
    limit = max_model_len * max_token_chars
    if num_chars > limit:
        raise APIError(
            400,
            f"'{param}' is {num_chars} characters long: more than a context of {max_model_len} tokens can "
            f"hold with this tokenizer (at most {limit} characters); please shorten it",
            param=param,
            code="context_length_exceeded",
        )
