"""Per-request sampling settings, validated before any compute."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tricklm.engine.reasoning import Reasoning
from tricklm.engine.structured import Grammar

_MAX_STOP = 16
_MAX_LOGPROBS = 20
# Below this a temperature is greedy (as in vLLM): dividing by it would overflow the logits to inf.
SAMPLING_EPS = 1e-5
# Dividing or multiplying a logit by a penalty below this could overflow float32 (and only ever
# means "never repeat", which 0.01 already does for any logit the model produces).
MIN_REPETITION_PENALTY = 0.01
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI-style defaults; temperature 0 means greedy."""

    max_tokens: int | None = 16  # None: the rest of the context window
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's plus the top k
    grammar: Grammar | None = None  # constrained decoding: only tokens the grammar allows are drawn
    reasoning: Reasoning | None = None  # a thinking model's tags: the grammar waits for the answer
    speculative: bool = True  # False: never drafted, even when the server speculates

    def __post_init__(self) -> None:
        for message in self._problems():
            raise ValueError(message)

    def _problems(self) -> list[str]:
        values = (
            self.temperature,
            self.top_p,
            self.min_p,
            self.presence_penalty,
            self.frequency_penalty,
            self.repetition_penalty,
            *self.logit_bias.values(),
        )
        if not all(math.isfinite(v) for v in values):
            return ["sampling parameters must be finite numbers"]
        checks = [
            (self.max_tokens is not None and self.max_tokens < 1, "max_tokens must be at least 1"),
            (not 0.0 <= self.temperature <= 100.0, "temperature must be between 0 and 100"),
            (not 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k < -1, "top_k must be -1, 0 (disabled) or positive"),
            (not 0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (not -2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (not -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (
                not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 2.0,
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, 2]",
            ),
            (
                self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
                "seed must fit in 64 bits",
            ),
            (len(self.stop) > _MAX_STOP, f"at most {_MAX_STOP} stop strings are allowed"),
            (any(not s for s in self.stop), "stop strings must not be empty"),
            (
                self.logprobs is not None and not 0 <= self.logprobs <= _MAX_LOGPROBS,
                f"logprobs must be between 0 and {_MAX_LOGPROBS}",
            ),
            (
                any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()),
                "logit_bias values must be in [-100, 100]",
            ),
        ]
        return [message for failed, message in checks if failed]

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def needs_penalties(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
        )


# The keys a model's generation_config.json may set (engine.generation_defaults reads the same ones)
MODEL_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def with_model_defaults(defaults: Mapping[str, Any], max_tokens: int | None, **values: Any) -> SamplingParams:
    """The one way a request becomes SamplingParams: a value left as None takes the model's
    generation_config default, else SamplingParams' own (OpenAI's). `max_tokens=None` means the rest of
    the context window, so it is passed as it is."""
    given = {k: v for k, v in values.items() if v is not None}
    for key in MODEL_DEFAULT_KEYS:
        if key not in given and key in defaults:
            given[key] = defaults[key]
    return SamplingParams(max_tokens=max_tokens, **given)
