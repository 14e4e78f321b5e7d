"""Attention over a paged KV cache, with the per-step metadata every layer shares.

The model runner lays out a step's tokens as: all decode tokens first (one per sequence), then each
prefill chunk. Decode sequences are attended in one batched call over their gathered, padded contexts;
each prefill chunk is attended on its own, since padding a long chunk to the batch would waste compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSegment:
    """One sequence's prefill chunk: tokens [token_start, token_end) of the step."""

    token_start: int
    token_end: int
    start_pos: int  # position of the chunk's first token in its sequence
    context_index: torch.Tensor | None  # cache slots of positions [0, start_pos + n); None if start_pos == 0
    # per attention window of the model's layers (None: whole context): additive mask, None where
    # plain is_causal does
    masks: dict[int | None, torch.Tensor | None]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot that each token's K/V is written to
    num_decode_tokens: int
    decode_context_index: torch.Tensor | None  # [B, Lmax] cache slots, padded
    # per attention window: [Hkv * B, 1, Lmax] additive, -inf on padding (see `decode_mask`)
    decode_masks: dict[int | None, torch.Tensor]
    prefills: list[PrefillSegment]


class KVCacheLayer:
    """K and V of one layer in one tensor, [2 * num_kv_heads, num_slots, head_dim]: K heads, then V heads.

    Head-major, a gather of slots lands already in the [heads, keys, dim] layout the attention matmuls
    read; one tensor for both, a step writes and gathers K and V with one op each instead of two.
    """

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv
        self.num_kv_heads = kv.shape[0] // 2


def paged_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    cache: KVCacheLayer,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D], kv: [T, 2 * Hkv, D] (K heads, then V heads) -> [T, Hq, D].

    `window`: the layer's sliding window (its masks must be in `meta`); `softcap`: scores become
    `softcap * tanh(score / softcap)` before the mask (Gemma 2).
    """
    cache.kv.index_copy_(1, meta.slot_mapping, kv.transpose(0, 1).to(cache.kv.dtype))
    nd = meta.num_decode_tokens
    decoded = None
    if nd:
        assert meta.decode_context_index is not None
        decoded = _decode_attention(q[:nd], cache, meta.decode_context_index, meta.decode_masks[window], scale, softcap)
        if not meta.prefills:
            return decoded  # the common step: decode only, no copy into a shared output
    out = torch.empty_like(q)
    if decoded is not None:
        out[:nd] = decoded
    h_kv = cache.num_kv_heads
    for seg in meta.prefills:
        s, e = seg.token_start, seg.token_end
        idx = seg.context_index
        # A first chunk attends over its K/V as the cache holds them, as later chunks, decode steps and prefix
        # cache hits do: a prompt's logits do not depend on how it was split or what was cached before
        fresh = kv[s:e].transpose(0, 1)
        ctx = fresh.to(cache.kv.dtype).to(q.dtype) if idx is None else cache.kv.index_select(1, idx)
        mask = seg.masks[window]
        if softcap is not None:
            full = mask if mask is not None else chunk_mask(0, e - s, None, q.dtype)
            out[s:e] = _attend_softcapped(q[s:e], ctx[:h_kv], ctx[h_kv:], full, scale, softcap)
        else:
            out[s:e] = _attend(q[s:e], ctx[:h_kv], ctx[h_kv:], mask, scale, causal=mask is None)
    return out


def _decode_attention(
    q: torch.Tensor, cache: KVCacheLayer, index: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    """One query per sequence over its gathered context: q [B, Hq, D] -> [B, Hq, D].

    Plain batched matmuls: for a single query row they beat the CPU flash-attention kernel, which is
    especially slow in bfloat16. `baddbmm` adds the mask and applies the scale inside the product.
    """
    b, length = index.shape
    h_kv, d = cache.num_kv_heads, cache.kv.shape[2]
    # index_select, not advanced indexing: the latter is far slower on CPU
    ctx = cache.kv.index_select(1, index.view(-1)).to(q.dtype).view(2, h_kv * b, length, d)
    qg = q.view(b, h_kv, -1, d).transpose(0, 1).reshape(h_kv * b, -1, d)  # query heads under their KV head
    if softcap is None:
        scores = torch.baddbmm(mask, qg, ctx[0].transpose(1, 2), alpha=scale)
    else:
        scores = _capped(torch.bmm(qg, ctx[0].transpose(1, 2)), scale, softcap) + mask
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, ctx[1]).view(h_kv, b, -1, d).transpose(0, 1).reshape(b, -1, d)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool
) -> torch.Tensor:
    """Single sequence: q [n, Hq, D], k/v [Hkv, L, D]."""
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.unsqueeze(0).to(q.dtype),
        v.unsqueeze(0).to(q.dtype),
        attn_mask=mask,
        is_causal=causal and mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return o.squeeze(0).transpose(0, 1)


def _attend_softcapped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float
) -> torch.Tensor:
    """`_attend` with capped scores, in plain matmuls (SDPA cannot cap): q [n, Hq, D], k/v [Hkv, L, D]."""
    n, h_q, d = q.shape
    h_kv = k.shape[0]
    qg = q.transpose(0, 1).reshape(h_kv, -1, d)  # query heads grouped under their KV head
    scores = _capped(torch.bmm(qg, k.to(q.dtype).transpose(1, 2)), scale, softcap)
    scores = scores.view(h_kv, h_q // h_kv, n, -1) + mask
    probs = torch.softmax(scores, dim=-1).view(h_kv, h_q // h_kv * n, -1)
    return torch.bmm(probs, v.to(q.dtype)).view(h_q, n, d).transpose(0, 1)


def _capped(scores: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    return torch.tanh(scores * (scale / softcap)) * softcap


def chunk_mask(start_pos: int, num_tokens: int, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask for a chunk at positions [start_pos, start_pos + n) over keys [0, start_pos + n)."""
    q_pos = torch.arange(start_pos, start_pos + num_tokens).unsqueeze(1)
    k_pos = torch.arange(start_pos + num_tokens).unsqueeze(0)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return _additive(allowed, dtype)


def decode_mask(
    context_lens: list[int], sliding_window: int | None, dtype: torch.dtype, num_kv_heads: int
) -> torch.Tensor:
    """[Hkv * B, 1, Lmax] additive mask: each row sees its own context (and window) only.

    Repeated per KV head once per step, so every layer's `baddbmm` can add it as is.
    """
    lens = torch.tensor(context_lens).unsqueeze(1)
    k_pos = torch.arange(max(context_lens)).unsqueeze(0)
    allowed = k_pos < lens
    if sliding_window is not None:
        allowed &= k_pos >= lens - sliding_window
    return _additive(allowed, dtype).repeat(num_kv_heads, 1).unsqueeze(1)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, float("-inf"))
