"""Per-request text assembly on the consumer side: incremental detokenization and stop strings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tricklm.engine.request import EngineOutput, TokenLogprob
from tricklm.engine.sampling_params import SamplingParams
from tricklm.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


@dataclass
class Delta:
    """What a client receives for one engine output: text safe to show and the tokens behind it."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class RequestTimings:
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    token_times: list[float] = field(default_factory=list)


class OutputProcessor:
    """Turns engine outputs into deltas. `stop_hit` tells the caller to abort the engine request."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, num_prompt_tokens: int) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = StopStringMatcher(params.stop)
        self.num_prompt_tokens = num_prompt_tokens
        self.num_cached_tokens = 0  # of the prompt, found in the prefix cache
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.stop_hit = False
        self.timings = RequestTimings()

    def process(self, out: EngineOutput) -> Delta:
        now = time.monotonic()
        if out.new_token_ids:
            self.timings.first_token = self.timings.first_token or now
            self.timings.last_token = now
            self.timings.token_times.append(now)
        self.token_ids.extend(out.new_token_ids)
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if self.logprobs is not None and out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.error is not None:
            self.error = out.error
            return Delta("", list(out.new_token_ids), error=out.error)
        raw = self._detok.push(out.new_token_ids)
        if out.finish_reason is not None:
            raw += self._detok.flush()
        text, hit = self._stop.push(raw)
        if hit:
            self.stop_hit = True
            self.finish_reason = "stop"
        elif out.finish_reason is not None:
            text += self._stop.flush()
            self.finish_reason = str(out.finish_reason)
        self.text += text
        return Delta(text, list(out.new_token_ids), out.logprobs, self.finish_reason)
