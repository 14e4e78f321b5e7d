"""Per-request text assembly on the consumer side: incremental detokenization and stop strings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from tricklm.engine.reasoning import Part, ReasoningState
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
    reasoning: str = ""  # a thinking model's reasoning text (`text` is then the answer's)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class _Trimmed:
    """Text passed on without its leading whitespace, and with trailing whitespace held until more text
    follows it (dropped at the end): the reasoning as the client sees it, streamed or whole."""

    def __init__(self) -> None:
        self.started = False
        self._held = ""

    def push(self, text: str, final: bool = False) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text = self._held + text
        body = text.rstrip()
        self._held = "" if final else text[len(body) :]
        return body


class _ThinkingSplit:
    """A thinking model's tokens into reasoning text and answer tokens, by the engine's own rule."""

    def __init__(self, state: ReasoningState, tokenizer: Tokenizer) -> None:
        self.state = state
        self._detok = IncrementalDetokenizer(tokenizer)
        self._text = _Trimmed()
        self._answer_started = False

    def push(self, token_ids: list[int], final: bool) -> tuple[str, list[int]]:
        """The reasoning text these tokens add, and the answer's tokens among them."""
        thought, answer = [], []
        for t in token_ids:
            part = self.state.advance(t)
            if part is Part.THOUGHT:
                thought.append(t)
            elif part is Part.ANSWER:
                answer.append(t)
        raw = self._detok.push(thought) + (self._detok.flush() if final else "")
        return self._text.push(raw, final), answer

    def answer_text(self, text: str) -> str:
        """After a reasoning, the answer without the blank lines the template puts after the closing tag."""
        if self._answer_started or not self._text.started:
            return text
        text = text.lstrip()
        self._answer_started = bool(text)
        return text


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
        self.num_draft_tokens = 0  # drafted for it (speculative decoding), and of those kept
        self.num_accepted_tokens = 0
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.text = ""
        self.reasoning = ""
        reasoning = params.reasoning
        self._thinking = _ThinkingSplit(ReasoningState(reasoning), tokenizer) if reasoning is not None else None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.stop_hit = False
        self.timings = RequestTimings()

    def process(self, out: EngineOutput) -> Delta:
        if len(out.new_token_ids) > 1 and self._stop.active and out.error is None:
            return self._process_each(out)
        return self._process(out)

    def _process_each(self, out: EngineOutput) -> Delta:
        """Several tokens of one step (a kept draft) taken one at a time, so that a stop string ends the
        reply at its own token and the tokens after it are neither counted nor shown."""
        deltas = []
        n = len(out.new_token_ids)
        for i, token in enumerate(out.new_token_ids):
            logprobs = out.logprobs[i : i + 1] if out.logprobs else None
            reason = out.finish_reason if i == n - 1 else None
            deltas.append(self._process(replace(out, new_token_ids=[token], logprobs=logprobs, finish_reason=reason)))
            if self.stop_hit:
                break
        logprobs = [lp for d in deltas for lp in d.logprobs or []] if out.logprobs else None
        return Delta(
            "".join(d.text for d in deltas),
            [t for d in deltas for t in d.token_ids],
            logprobs,
            self.finish_reason,
            reasoning="".join(d.reasoning for d in deltas),
        )

    def _process(self, out: EngineOutput) -> Delta:
        now = time.monotonic()
        if out.new_token_ids:
            self.timings.first_token = self.timings.first_token or now
            self.timings.last_token = now
            self.timings.token_times.append(now)
        self.token_ids.extend(out.new_token_ids)
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        self.num_draft_tokens = max(self.num_draft_tokens, out.num_draft_tokens)
        self.num_accepted_tokens = max(self.num_accepted_tokens, out.num_accepted_tokens)
        if self.logprobs is not None and out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.error is not None:
            self.error = out.error
            return Delta("", list(out.new_token_ids), error=out.error)
        final = out.finish_reason is not None
        answer, thought = out.new_token_ids, ""
        if self._thinking is not None:
            thought, answer = self._thinking.push(out.new_token_ids, final)
            self.reasoning += thought
        raw = self._detok.push(answer) + (self._detok.flush() if final else "")
        if self._thinking is not None:
            raw = self._thinking.answer_text(raw)
        text, hit = self._stop.push(raw)
        if hit:
            self.stop_hit = True
            self.finish_reason = "stop"
        elif out.finish_reason is not None:
            text += self._stop.flush()
            self.finish_reason = str(out.finish_reason)
        self.text += text
        return Delta(text, list(out.new_token_ids), out.logprobs, self.finish_reason, reasoning=thought)

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the reply, if one did."""
        return self._stop.matched

    @property
    def reasoning_tokens(self) -> int:
        """Tokens of the reply spent thinking, its tags included."""
        return self._thinking.state.tokens if self._thinking is not None else 0
