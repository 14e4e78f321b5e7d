"""Speculative decoding with n-gram drafts (prompt lookup): more than one token per read of the weights.

A decoding request whose recent tokens occurred earlier in its own prompt or output (a summary quoting
its source, an edit of code, JSON repeating its keys) gets the tokens that followed that occurrence as
a draft. The scheduler computes the draft with the request's next token as k+1 rows of the ordinary
step, beside the other requests' prefill and decode rows; `verify` then keeps the longest prefix of the
draft the model agrees with, plus one token of its own, and the KV of the rest is overwritten later.

Exactly the model's distribution: greedy requests keep a draft token only where it is the argmax (the
output equals non-speculative greedy up to the kernels' own tolerance); sampled ones keep draft token d
with the probability p(d) the model gives it after temperature and filters, and on a rejection draw from p
without d (renormalized), which is rejection sampling's residual (p - q)+ for a draft distribution q that
is all on d. A request's draft length adapts to what it recently accepted; one whose drafts keep
failing waits ever longer before drafting again, and no step drafts when so many requests decode that
the step is bound by compute rather than by reading the weights.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tricklm.config import SPECULATIVE_MODES
from tricklm.engine.request import Request, Sampled, TokenLogprob


@dataclass(frozen=True)
class SpecConfig:
    mode: str = "none"  # "ngram": prompt-lookup drafts
    max_draft: int = 10  # tokens a draft may have
    min_ngram: int = 2  # the shortest suffix looked up (a single token matches too much by chance)
    max_ngram: int = 4
    # No step drafts when more requests than this decode at once: past it a step's time grows with its
    # rows (the weights are read once however many there are), so verifying drafts costs more than it
    # saves. Measured: benchmarks/README.md
    max_decoding: int = 2

    def __post_init__(self) -> None:
        if self.mode not in SPECULATIVE_MODES:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_MODES)}")
        if not 1 <= self.min_ngram <= self.max_ngram or self.max_draft < 1 or self.max_decoding < 1:
            raise ValueError("speculative settings out of range")


@dataclass
class SpecState:
    """One request's drafting: its draft length, its back-off, and what it drafted and kept."""

    k: int
    cooldown: int = 0  # steps to skip before drafting again
    backoff: int = 1  # the next cooldown after another fully rejected draft
    num_drafted: int = 0
    num_accepted: int = 0

    def after(self, drafted: int, accepted: int, max_draft: int) -> None:
        self.num_drafted += drafted
        self.num_accepted += accepted
        if accepted == drafted:
            self.k = min(self.k + 1, max_draft)
            self.backoff = 1
        elif accepted == 0:
            self.k = max(self.k // 2, 1)
            if self.k == 1:
                self.cooldown, self.backoff = self.backoff, min(self.backoff * 2, 64)
        else:
            self.k = max(accepted + 1, 1)


def propose(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the longest suffix of `tokens`
    (from `max_n` tokens down to `min_n`); none if no suffix occurred before. Searched as bytes, in C."""
    if k < 1 or len(tokens) <= min_n:
        return []
    data = array("i", tokens).tobytes()
    width = array("i").itemsize
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = data[-n * width :]
        end = len(data) - width  # the match must end before the last token: its follower is known
        while end > 0:
            at = data.rfind(suffix, 0, end)
            if at < 0:
                break
            if at % width == 0:
                start = at // width + n
                return list(tokens[start : start + k])
            end = at + len(suffix) - 1
    return []


def verify(logits: torch.Tensor, req: Request, draft: list[int]) -> Sampled:
    """The model's verdict on `draft`: `logits` has len(draft) + 1 rows (after the request's last token
    and after each draft token). Returns the kept draft tokens (`accepted`) and the token after them."""
    logits = logits.float()
    if not torch.isfinite(logits.max(dim=-1).values).all():
        return Sampled(-1, error="the model produced non-finite logits for this request")
    if req.params.is_greedy:
        best = logits.argmax(dim=-1).tolist()
        n = 0
        while n < len(draft) and best[n] == draft[n]:
            n += 1
        return _result(logits, req, draft[:n], best[n])
    probs = _probabilities(logits, req)
    for i, token in enumerate(draft):
        p = float(probs[i, token])
        if _uniform(req) >= p:  # rejected: draw from the rest of the distribution
            rest = probs[i].clone()
            rest[token] = 0.0
            if float(rest.sum()) <= 0.0:  # p was 1 (to rounding): nothing else can be drawn
                continue
            return _result(logits, req, draft[:i], _draw(rest / rest.sum(), req))
    return _result(logits, req, draft, _draw(probs[len(draft)], req))


def _probabilities(logits: torch.Tensor, req: Request) -> torch.Tensor:
    from tricklm.engine.sampler import _filter

    p = req.params
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0:
        probs = _filter(probs, [req] * len(probs))
    return probs


def _uniform(req: Request) -> float:
    return float(torch.rand(1, generator=req.generator, dtype=torch.float64))


def _draw(probs: torch.Tensor, req: Request) -> int:
    cdf = probs.double().cumsum(dim=0)
    target = _uniform(req) * float(cdf[-1])
    pick = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64), right=True))
    pick = min(pick, len(probs) - 1)
    return pick if float(probs[pick]) > 0 else int(probs.argmax())


def _result(logits: torch.Tensor, req: Request, accepted: list[int], token: int) -> Sampled:
    k = req.params.logprobs
    if k is None:
        return Sampled(token, accepted=accepted)
    from tricklm.engine.sampler import MIN_LOGPROB

    lps = torch.log_softmax(logits[: len(accepted) + 1], dim=-1).clamp(min=MIN_LOGPROB)
    entries = []
    for row, tid in zip(lps, [*accepted, token], strict=True):
        top: list[tuple[int, float]] = []
        if k > 0:
            values, indices = row.topk(k)
            top = list(zip(indices.tolist(), values.tolist(), strict=True))
        entries.append(TokenLogprob(tid, float(row[tid]), top))
    return Sampled(token, entries[-1], accepted=accepted, accepted_logprobs=entries[:-1])
