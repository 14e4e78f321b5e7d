"""Per-request sampling settings, validated before any compute."""

from __future__ import annotations

from dataclasses import dataclass, field

_MAX_STOP = 16
_MAX_LOGPROBS = 20


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

    def __post_init__(self) -> None:
        for message in self._problems():
            raise ValueError(message)

    def _problems(self) -> list[str]:
        checks = [
            (self.max_tokens is not None and self.max_tokens < 1, "max_tokens must be at least 1"),
            (not 0.0 <= self.temperature <= 100.0, "temperature must be between 0 and 100"),
            (not 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k < -1, "top_k must be -1, 0 (disabled) or positive"),
            (not 0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (not -2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (not -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (not 0.0 < self.repetition_penalty <= 2.0, "repetition_penalty must be in (0, 2]"),
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
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
        )
