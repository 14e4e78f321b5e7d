"""Every route's request becomes SamplingParams here, and only here.

A request model says which values it was given (`sampling_values`, None where the client left one out);
this turns them into SamplingParams with the model's generation_config defaults (as vLLM does), checks
what needs the tokenizer (logit_bias keys), and maps refusals to 400s naming the parameter.
"""

from __future__ import annotations

from typing import Any, Protocol

from tricklm.engine.reasoning import Reasoning
from tricklm.engine.sampling_params import SamplingParams, with_model_defaults
from tricklm.engine.structured import Grammar
from tricklm.server.engine_client import EngineClient
from tricklm.server.errors import APIError
from tricklm.server.state import engine_errors


class SamplingSource(Protocol):
    def sampling_values(self) -> dict[str, Any]:
        """SamplingParams fields as the request gave them; None means "not given"."""
        ...


def to_sampling_params(
    client: EngineClient, body: SamplingSource, grammar: Grammar | None = None, reasoning: Reasoning | None = None
) -> SamplingParams:
    values = body.sampling_values()
    max_tokens = values.pop("max_tokens", None)
    values["logit_bias"] = _logit_bias(values.pop("logit_bias", None), client.vocab_size)
    with engine_errors():
        return with_model_defaults(
            client.generation_defaults, max_tokens, grammar=grammar, reasoning=reasoning, **values
        )


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= token_id < vocab_size or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias entry {key}: {value} is out of range", param="logit_bias")
        out[token_id] = value
    return out
