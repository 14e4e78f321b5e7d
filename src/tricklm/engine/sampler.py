"""Turns the last-position logits of each sampling request into a token, with per-request settings.

Greedy rows take an argmax; the rest get penalties, temperature, top-k/top-p/min-p filters and a draw
from their own generator (seeded requests draw the same tokens alone or batched).
"""

from __future__ import annotations

import torch

from tricklm.engine.request import Request, TokenLogprob


def sample(logits: torch.Tensor, requests: list[Request]) -> list[tuple[int, TokenLogprob | None]]:
    logits = logits.float()
    if any(r.params.needs_penalties for r in requests):
        logits = logits.clone()
        for i, req in enumerate(requests):
            if req.params.needs_penalties:
                _apply_penalties(logits[i], req)
    token_ids = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(requests) if not r.params.is_greedy]
    if random_rows:
        drawn = _draw(logits[random_rows], [requests[i] for i in random_rows])
        token_ids[random_rows] = drawn
    ids: list[int] = token_ids.tolist()
    return [(tid, _logprob(logits[i], tid, req)) for i, (tid, req) in enumerate(zip(ids, requests, strict=True))]


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


def _draw(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    temps = torch.tensor([r.params.temperature for r in requests], dtype=logits.dtype).unsqueeze(1)
    probs = torch.softmax(logits / temps, dim=-1)
    if any(r.params.top_k > 0 or r.params.top_p < 1.0 or r.params.min_p > 0 for r in requests):
        probs = _filter(probs, requests)
    out = torch.empty(len(requests), dtype=torch.long)
    for i, req in enumerate(requests):
        out[i] = torch.multinomial(probs[i], 1, generator=req.generator).item()
    return out


def _filter(probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Zero out what top-k, top-p and min-p exclude (on sorted probabilities), then renormalise."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    vocab = probs.shape[-1]
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in requests]).unsqueeze(1)
    top_p = torch.tensor([r.params.top_p for r in requests], dtype=probs.dtype).unsqueeze(1)
    min_p = torch.tensor([r.params.min_p for r in requests], dtype=probs.dtype).unsqueeze(1)
    rank = torch.arange(vocab).unsqueeze(0)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    keep = (rank < top_k) & (mass_before < top_p) & (sorted_p >= min_p * sorted_p[:, :1])
    keep[:, 0] = True  # the most likely token always survives
    sorted_p = sorted_p * keep
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def _logprob(row: torch.Tensor, token_id: int, req: Request) -> TokenLogprob | None:
    k = req.params.logprobs
    if k is None:
        return None
    logprobs = torch.log_softmax(row, dim=-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, indices = logprobs.topk(k)
        top = list(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(logprobs[token_id]), top)
