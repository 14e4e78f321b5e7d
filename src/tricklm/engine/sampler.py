"""Turns the last-position logits of each sampling request into a token, with per-request settings.

Greedy rows take an argmax; the rest get penalties, temperature, top-k/top-p/min-p filters and a draw
from their own generator (seeded requests draw the same tokens alone or batched). A row with a grammar
(structured outputs) first loses every token its grammar does not allow; the scheduler advances its
matcher with the drawn token as it commits it. A row that cannot be sampled (non-finite logits, a failed
draw, a failed grammar) fails its own request and no other.
"""

from __future__ import annotations

import torch

from tricklm.engine.request import Request, Sampled, TokenLogprob
from tricklm.engine.structured import mask_logits

NON_FINITE = "the model produced non-finite logits for this request"


def sample(logits: torch.Tensor, requests: list[Request]) -> list[Sampled]:
    logits = logits.float()
    constrained = [
        (i, grammar, r.matcher) for i, r in enumerate(requests) if (grammar := r.params.grammar) and r.constrained
    ]
    if constrained or any(r.params.needs_penalties for r in requests):
        logits = logits.clone()
        for i, req in enumerate(requests):
            if req.params.needs_penalties:
                _apply_penalties(logits[i], req)
    # one pass gives each row's max and where it is (torch's argmax alone is slower than max: benchmarks/README.md)
    top, best = logits.max(dim=-1)
    errors = dict.fromkeys(_bad_rows(top), NON_FINITE)
    if constrained:  # after the finiteness check: a masked row is all -inf but where the grammar allows
        opening = {
            i: (tag, float(logits[i, tag])) for i, r in enumerate(requests) if (tag := r.opening_tag()) is not None
        }
        errors |= mask_logits(logits, constrained)
        for i, (tag, value) in opening.items():  # a thinking model may open its reasoning before the answer
            logits[i, tag] = value
        best = logits.argmax(dim=-1)
    token_ids: list[int] = best.tolist()
    random_rows = [i for i, r in enumerate(requests) if not r.params.is_greedy and i not in errors]
    if random_rows:
        for i, drawn in zip(random_rows, _draw_rows(logits, requests, random_rows), strict=True):
            if isinstance(drawn, str):
                errors[i] = drawn
            else:
                token_ids[i] = drawn
    for i, req in enumerate(requests):
        forced = req.forced_token()
        if forced is not None and i not in errors:
            token_ids[i] = forced  # a spent reasoning budget closes the thinking
    return [
        Sampled(-1, error=errors[i]) if i in errors else Sampled(tid, _logprob(logits[i], tid, req))
        for i, (tid, req) in enumerate(zip(token_ids, requests, strict=True))
    ]


def _bad_rows(top: torch.Tensor) -> list[int]:
    """From the rows' maxima: rows with a NaN or +inf, or with nothing finite to choose (no token can be
    drawn from them). A row's max is NaN if any entry is, +inf if any entry is, and -inf only if no entry
    is finite: one reduction instead of three full passes."""
    bad = top.isnan() | top.isinf()
    return bad.nonzero().flatten().tolist()  # type: ignore[no-any-return]


def _apply_penalties(row: torch.Tensor, req: Request) -> None:
    p = req.params
    for token_id, bias in p.logit_bias.items():
        if 0 <= token_id < row.shape[0]:
            row[token_id] += bias
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.prompt_token_ids) | set(req.output_token_ids)), dtype=torch.long)
        if len(seen):
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
        out = torch.tensor(req.output_token_ids, dtype=torch.long)
        counts = torch.bincount(out, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _draw_rows(logits: torch.Tensor, requests: list[Request], rows: list[int]) -> list[int | str]:
    """The rows' draws together; if that fails, each alone, so that the failure stays with its row."""
    try:
        return _draw(logits[rows], [requests[i] for i in rows])
    except (RuntimeError, ValueError):
        out: list[int | str] = []
        for i in rows:
            try:
                out += _draw(logits[i : i + 1], [requests[i]])
            except (RuntimeError, ValueError) as e:
                out.append(f"sampling failed: {e}")
        return out


def _draw(logits: torch.Tensor, requests: list[Request]) -> list[int | str]:
    """A token per row, or the reason that row could not be drawn."""
    temps = torch.tensor([r.params.temperature for r in requests], dtype=logits.dtype).unsqueeze(1)
    probs = torch.softmax(logits / temps, dim=-1)
    if any(r.params.top_k > 0 or r.params.top_p < 1.0 or r.params.min_p > 0 for r in requests):
        probs = _filter(probs, requests)
    return _inverse_cdf(probs, requests)


_CDF_BLOCK = 256


def _inverse_cdf(probs: torch.Tensor, requests: list[Request]) -> list[int | str]:
    """One uniform draw per row (from the row's own generator when seeded), looked up in the row's
    cumulative distribution. Exact, and much cheaper than torch.multinomial row by row: the lookup runs on
    sums of blocks of 256 tokens, then within the one block chosen, so the float64 sums (which keep the
    tail's tokens their share) cover a few hundred numbers a row instead of the whole vocabulary."""
    rows, vocab = probs.shape
    pad = (-vocab) % _CDF_BLOCK
    blocks = (
        torch.nn.functional.pad(probs, (0, pad)).view(rows, -1, _CDF_BLOCK) if pad else probs.view(rows, -1, _CDF_BLOCK)
    )
    block_cdf = blocks.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)
    totals = block_cdf[:, -1]
    uniforms = torch.cat([torch.rand(1, generator=r.generator, dtype=torch.float64) for r in requests])
    target = (uniforms * totals).unsqueeze(1)
    # right=True: the first index whose cumulative sum exceeds the draw, so never a block of mass 0
    block = torch.searchsorted(block_cdf, target, right=True).clamp(max=block_cdf.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    within = blocks[torch.arange(rows), block.flatten()].double().cumsum(dim=-1)
    offset = torch.searchsorted(within, target - before, right=True).clamp(max=_CDF_BLOCK - 1)
    picks = (block * _CDF_BLOCK + offset).flatten().clamp(max=vocab - 1)
    # Rounding at a block's edge could land on a token of probability 0: take the row's likeliest instead
    lost = probs.gather(1, picks.unsqueeze(1)).flatten() <= 0
    if lost.any():
        picks = torch.where(lost, probs.argmax(dim=-1), picks)
    valid = torch.isfinite(totals) & (totals > 0)  # softmax and the filters never make a negative entry
    return [
        int(pick) if ok else "sampling failed: the row's probabilities do not form a distribution"
        for pick, ok in zip(picks.tolist(), valid.tolist(), strict=True)
    ]


def _filter(probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Zero out what top-k, top-p and min-p exclude (on sorted probabilities), then renormalise."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    vocab = probs.shape[-1]
    top_k = torch.tensor([r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in requests]).unsqueeze(1)
    top_p = torch.tensor([r.params.top_p for r in requests], dtype=probs.dtype).unsqueeze(1)
    min_p = torch.tensor([r.params.min_p for r in requests], dtype=probs.dtype).unsqueeze(1)
    rank = torch.arange(vocab).unsqueeze(0)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    keep = (rank < top_k) & (mass_before < top_p) & (sorted_p >= min_p * sorted_p[:, :1])
    keep[:, 0] = True  # the most likely token always survives
    sorted_p = sorted_p * keep
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return filtered / filtered.sum(dim=-1, keepdim=True)


# OpenAI's and vLLM's stand-in for a log probability of -inf: JSON has no infinity.
MIN_LOGPROB = -9999.0


def _logprob(row: torch.Tensor, token_id: int, req: Request) -> TokenLogprob | None:
    k = req.params.logprobs
    if k is None:
        return None
    logprobs = torch.log_softmax(row, dim=-1).clamp(min=MIN_LOGPROB)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, indices = logprobs.topk(k)
        top = list(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(logprobs[token_id]), top)
