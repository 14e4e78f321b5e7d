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
    mask: torch.Tensor | None  # additive mask when the chunk cannot use is_causal


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot that each token's K/V is written to
    num_decode_tokens: int
    decode_context_index: torch.Tensor | None  # [B, Lmax] cache slots, padded
    decode_mask: torch.Tensor | None  # [B, 1, 1, Lmax] additive, -inf on padding
    prefills: list[PrefillSegment]


class KVCacheLayer:
    """K and V for one layer, stored head-major as [num_kv_heads, num_slots, head_dim].

    Head-major, a gather of slots lands already in the [heads, keys, dim] layout the attention matmuls
    read, so no second copy is made per layer and step.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = k
        self.v = v


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCacheLayer,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""
    cache.k.index_copy_(1, meta.slot_mapping, k.transpose(0, 1).to(cache.k.dtype))
    cache.v.index_copy_(1, meta.slot_mapping, v.transpose(0, 1).to(cache.v.dtype))
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        assert meta.decode_context_index is not None and meta.decode_mask is not None
        out[:nd] = _decode_attention(q[:nd], cache, meta.decode_context_index, meta.decode_mask, scale)
    for seg in meta.prefills:
        s, e = seg.token_start, seg.token_end
        if seg.context_index is None:
            ks, vs = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
        else:
            ks, vs = cache.k.index_select(1, seg.context_index), cache.v.index_select(1, seg.context_index)
        out[s:e] = _attend(q[s:e], ks, vs, seg.mask, scale, causal=seg.mask is None)
    return out


def _decode_attention(
    q: torch.Tensor, cache: KVCacheLayer, index: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per sequence over its gathered context: q [B, Hq, D] -> [B, Hq, D].

    Plain batched matmuls: for a single query row they beat the CPU flash-attention kernel, which is
    especially slow in bfloat16.
    """
    b, length = index.shape
    h_kv, _, d = cache.k.shape
    flat = index.view(-1)
    # index_select, not advanced indexing: the latter is far slower on CPU
    k = cache.k.index_select(1, flat).view(h_kv, b, length, d).to(q.dtype)
    v = cache.v.index_select(1, flat).view(h_kv, b, length, d).to(q.dtype)
    qg = q.view(b, h_kv, -1, d).transpose(0, 1)  # [Hkv, B, G, D]: query heads under their KV head
    scores = torch.matmul(qg, k.transpose(2, 3)).float() * scale + mask.view(1, b, 1, length)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(b, -1, d)


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


def chunk_mask(start_pos: int, num_tokens: int, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask for a chunk at positions [start_pos, start_pos + n) over keys [0, start_pos + n)."""
    q_pos = torch.arange(start_pos, start_pos + num_tokens).unsqueeze(1)
    k_pos = torch.arange(start_pos + num_tokens).unsqueeze(0)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return _additive(allowed, dtype)


def decode_mask(context_lens: list[int], sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, Lmax] additive mask: each row sees its own context (and window) only."""
    lens = torch.tensor(context_lens).unsqueeze(1)
    k_pos = torch.arange(max(context_lens)).unsqueeze(0)
    allowed = k_pos < lens
    if sliding_window is not None:
        allowed &= k_pos >= lens - sliding_window
    return _additive(allowed, dtype)[:, None, None, :]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, float("-inf"))
