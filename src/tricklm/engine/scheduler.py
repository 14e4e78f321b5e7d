"""Decides, each step, how many tokens every request computes.

Prefill, chunked prefill and decode are one mechanism: a request computes the tokens it has not yet
computed, up to the step's token budget. Running requests go first (decodes are one token each), then
waiting requests are admitted in arrival order while slots, budget and KV blocks allow. When the
cache runs out mid-decode, the most recently admitted request is preempted (its blocks freed, to be
recomputed later), so admission never deadlocks and nothing grows without bound. A request admitted
with prefix caching starts after the longest prefix of its tokens already in the KV cache (a preempted
request usually finds its own blocks there).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tricklm.engine.kv_cache import KVCache, prefix_hashes
from tricklm.engine.request import EngineOutput, FinishReason, Request, RequestStatus, Sampled
from tricklm.engine.speculative import SpecConfig, SpecState, propose


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requests)

    def samples(self, i: int) -> bool:
        """Whether request i has computed all its known tokens after this step (so it samples one)."""
        req = self.requests[i]
        return req.num_computed_tokens + self.num_tokens[i] == req.num_scheduled_tokens


class Scheduler:
    def __init__(
        self, kv_cache: KVCache, max_num_seqs: int, max_num_batched_tokens: int, spec: SpecConfig | None = None
    ) -> None:
        self.kv = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.spec = spec or SpecConfig()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_drafts = 0  # verified drafts, their tokens, and how many of those were kept
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._draft()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        self._admit_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        # Decodes (1 token) before prefill chunks, so a long prompt never starves running streams.
        for req in sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1):
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            need = req.num_scheduled_tokens - req.num_computed_tokens
            if req.draft and (need > budget or not self.kv.can_allocate(req, need)):
                req.draft = []  # verified whole or not at all, and never at the cost of preempting another
            n = min(req.num_scheduled_tokens - req.num_computed_tokens, budget)
            if not self._make_room(req, n, batch):
                continue
            self.kv.allocate(req, n)
            batch.requests.append(req)
            batch.num_tokens.append(n)
            budget -= n
        return budget

    def _draft(self) -> None:
        """Drafts for the decoding requests that may speculate, when few enough decode (speculative.py)."""
        for req in self.running:
            req.draft = []
        spec = self.spec
        if spec.mode == "none":
            return
        decoding = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        if len(decoding) > spec.max_decoding:
            return
        for req in decoding:
            if not req.may_speculate:
                continue
            state = req.spec = req.spec or SpecState(spec.max_draft)
            if state.cooldown:
                state.cooldown -= 1
                continue
            room = req.max_tokens - len(req.output_token_ids) - 1  # the verified step adds one more
            req.draft = propose(req.all_token_ids(), min(state.k, room), spec.min_ngram, spec.max_ngram)

    def _make_room(self, req: Request, n: int, batch: ScheduledBatch) -> bool:
        """Preempt the newest unscheduled running requests until `req` fits; False if `req` had to go."""
        while not self.kv.can_allocate(req, n):
            victims = [r for r in reversed(self.running) if r is not req and r not in batch.requests]
            victim = victims[0] if victims else req
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.draft = []
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def restart(self) -> list[Request]:
        """Forget the cache: every live request waits again (in arrival order) to be recomputed.

        Returns the requests that were running: the suspects of whatever made the engine restart.
        """
        running = self.running
        live = sorted([*self.running, *self.waiting], key=lambda r: r.arrival_time)
        self.kv.reset()
        for req in live:
            req.block_table = []
            req.draft = []
            req.num_computed_tokens = 0
            req.status = RequestStatus.WAITING
        self.running = []
        self.waiting = deque(live)
        return running

    def schedule_alone(self, req: Request) -> ScheduledBatch:
        """A step of `req` only (admitting it if it waits); empty if it has finished or does not fit."""
        if req.status.is_finished:
            return ScheduledBatch()
        n = min(req.num_tokens - req.num_computed_tokens, self.max_num_batched_tokens)
        if not self.kv.can_allocate(req, n):
            return ScheduledBatch()
        if req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        self.kv.allocate(req, n)
        return ScheduledBatch([req], [n])

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            hits = self.kv.cached_prefix(req)
            if self._being_computed(req, len(hits)):
                break  # its next block is in another request's prefill: wait a step and share it
            self.kv.take(req, hits)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.can_allocate(req, n):
                self.kv.free(req)  # the shared blocks go back to the cache; they are found again next time
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if self.kv.prefix_caching:
                self.kv.num_queried_tokens += req.num_tokens
                self.kv.num_hit_tokens += req.num_computed_tokens
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
                req.num_cached_tokens = req.num_computed_tokens
            self.running.append(req)
            self.kv.allocate(req, n)
            batch.requests.append(req)
            batch.num_tokens.append(n)
            budget -= n

    def _being_computed(self, req: Request, num_hits: int) -> bool:
        """Whether the block after `req`'s cached prefix is being computed by a running request (the
        choices of one prompt with n > 1, or conversations arriving together with one system prompt)."""
        if not self.kv.prefix_caching or num_hits >= (req.num_tokens - 1) // self.kv.block_size:
            return False
        wanted = prefix_hashes(req, self.kv.block_size)[num_hits]
        for other in self.running:
            done = other.num_computed_tokens // self.kv.block_size
            hashes = prefix_hashes(other, self.kv.block_size)
            if done < len(hashes) and wanted in hashes[done:]:
                return True
        return False

    def update(self, batch: ScheduledBatch, sampled: dict[str, Sampled]) -> list[EngineOutput]:
        """Advance every scheduled request; return a delta for each one that produced tokens (or failed)."""
        outputs = []
        for req, n in zip(batch.requests, batch.num_tokens, strict=True):
            before, drafted = req.num_computed_tokens, req.draft
            req.draft = []
            # The known tokens are computed; a draft's, only as far as it is kept (the rest is overwritten)
            req.num_computed_tokens += n - len(drafted)
            draw = sampled.get(req.request_id)
            if draw is None:
                self.kv.cache_full_blocks(req, before)
                continue
            if draw.error is not None:  # KV of a step whose logits failed is not shared
                self._finish(req, FinishReason.ABORT)
                outputs.append(EngineOutput.failed(req, draw.error))
                continue
            if drafted:
                self._count_draft(req, len(drafted), len(draw.accepted))
            outputs.append(self._commit(req, before, draw))
        return outputs

    def _commit(self, req: Request, computed_before: int, draw: Sampled) -> EngineOutput:
        """Take a draw's tokens (kept draft tokens, then the sampled one) up to the first that ends it."""
        tokens = [*draw.accepted, draw.token_id]
        logprobs = [*draw.accepted_logprobs, draw.logprob] if draw.logprob is not None else None
        reason = None
        for i, token in enumerate(tokens):
            if i:
                req.num_computed_tokens += 1  # the kept draft token before this one: its KV was computed
            if not req.commit(token):
                self.kv.cache_full_blocks(req, computed_before)
                self._finish(req, FinishReason.ABORT)
                return EngineOutput.failed(req, f"the grammar failed: {req.matcher.get_error()}")
            reason = req.finish_reason_for(token)
            if reason is not None:
                tokens, logprobs = tokens[: i + 1], logprobs[: i + 1] if logprobs is not None else None
                break
        self.kv.cache_full_blocks(req, computed_before)
        if reason is not None:
            self._finish(req, reason)
        spec = req.spec
        return EngineOutput(
            req.request_id,
            tokens,
            reason,
            logprobs,
            req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            num_draft_tokens=spec.num_drafted if spec is not None else 0,
            num_accepted_tokens=spec.num_accepted if spec is not None else 0,
        )

    def _count_draft(self, req: Request, drafted: int, accepted: int) -> None:
        assert req.spec is not None
        req.spec.after(drafted, accepted, self.spec.max_draft)
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    self._finish(req, FinishReason.ABORT)
                    return req
        return None

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = {
            FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
            FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
            FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
        }[reason]
