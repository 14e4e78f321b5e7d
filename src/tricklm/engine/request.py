"""A request's life inside the engine: token ids, progress, and how it ended."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tricklm.engine.reasoning import Part, ReasoningState
from tricklm.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tricklm.engine.speculative import SpecState


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class FinishReason(enum.StrEnum):
    """The string is the OpenAI `finish_reason`."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sampled:
    """One request's draw in a step: a token, or why there is none (that request alone then ends)."""

    token_id: int
    logprob: TokenLogprob | None = None
    error: str | None = None
    accepted: list[int] = field(default_factory=list)  # draft tokens kept before `token_id` (speculative.py)
    accepted_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against the context window at admission
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    first_scheduled_time: float | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks: see kv_cache.prefix_hashes
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at its first admission
    matcher: Any = None  # its grammar's state (structured.py), advanced by each token of the answer
    reasoning: ReasoningState | None = None  # where a thinking model's reply is (reasoning.py)
    draft: list[int] = field(default_factory=list)  # tokens proposed after the known ones, verified this step
    spec: SpecState | None = None  # its drafting (speculative.py), once it has drafted

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)
        if self.params.grammar is not None:
            self.matcher = self.params.grammar.matcher()
        if self.params.reasoning is not None:
            self.reasoning = ReasoningState(self.params.reasoning)

    @property
    def constrained(self) -> bool:
        """Whether its grammar masks the next token (a thinking model's answer only)."""
        r = self.reasoning
        return self.matcher is not None and (r is None or r.constrains or r.may_open)

    def opening_tag(self) -> int | None:
        """The thinking's opening tag while the next token may be it: a grammar must leave it allowed."""
        r = self.reasoning
        return r.spec.tags.start_id if r is not None and r.may_open else None

    def forced_token(self) -> int | None:
        """The token the next step must produce (a spent reasoning budget closing the thinking)."""
        return self.reasoning.next_forced() if self.reasoning is not None else None

    def commit(self, token_id: int) -> bool:
        """Take a sampled token; False if its grammar refuses it (the grammar failing, since the mask
        allowed only what it takes)."""
        answer = self.reasoning is None or self.reasoning.advance(token_id) is Part.ANSWER
        if answer and self.matcher is not None and not self.matcher.consume_token(token_id):
            return False
        self.output_token_ids.append(token_id)  # the matcher took it too: both advance together
        return True

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def may_speculate(self) -> bool:
        """Whether its tokens may be drafted: not where a grammar, a penalty that depends on the tokens
        before, or a reasoning budget decides a token from more than the model's logits."""
        p = self.params
        budgeted = p.reasoning is not None and p.reasoning.budget is not None
        return p.speculative and p.grammar is None and not p.needs_penalties and not budgeted

    @property
    def num_scheduled_tokens(self) -> int:
        """Its known tokens and its draft: what a step may compute."""
        return self.num_tokens + len(self.draft)

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_id(self, position: int) -> int:
        n, m = len(self.prompt_token_ids), self.num_tokens
        if position < n:
            return self.prompt_token_ids[position]
        return self.output_token_ids[position - n] if position < m else self.draft[position - m]

    def finish_reason_for(self, token_id: int) -> FinishReason | None:
        if not self.params.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.STOP
        if token_id in self.params.stop_token_ids:
            return FinishReason.STOP
        if self.matcher is not None and self.matcher.is_stopped():  # the grammar is complete
            return FinishReason.STOP
        if len(self.output_token_ids) >= self.max_tokens:
            return FinishReason.LENGTH
        return None


@dataclass
class EngineOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    error: str | None = None
    num_cached_tokens: int = 0
    num_draft_tokens: int = 0  # so far, of the request's drafts (speculative decoding), and of those kept
    num_accepted_tokens: int = 0

    @classmethod
    def failed(cls, req: Request, message: str) -> EngineOutput:
        """The end of a request that failed (its client gets `message`; nobody else is affected)."""
        return cls(req.request_id, [], num_prompt_tokens=req.num_prompt_tokens, error=message)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None
