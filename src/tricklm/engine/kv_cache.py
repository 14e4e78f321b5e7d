"""The KV cache: allocated once from a memory budget, handed out to requests in fixed-size blocks.

With prefix caching, a full block is known by a hash chained over every token up to its end
(`prefix_hashes`), so two requests whose token ids agree up to there can share it. A block is shared by
reference count; when nobody uses it any more it stays cached, evictable in least-recently-freed order,
until its memory is wanted for new tokens.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

from tricklm.engine.request import Request
from tricklm.model.attention import KVCacheLayer
from tricklm.model.config import ModelConfig


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


class KVCache:
    """Paged storage: slot s of every layer holds one token's K and V; block b owns slots [b*bs, (b+1)*bs).

    Block 0 is zeroed and never handed out: every padded gather index points there, so attention never
    reads a slot that was not written. That lets the rest stay uninitialised: the OS maps its pages on
    first write, so resident memory grows with use, as a native server's does, not with the budget. Blocks
    are handed out lowest first (`_take`): without prefix caching the pages ever touched stay as few as
    the peak number of blocks in use; with it, cached blocks fill the budget before any is evicted, so
    resident memory grows to the budget as the cache fills, and no further.
    """

    def __init__(
        self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, prefix_caching: bool = True
    ) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache budget is too small for even one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        shape = (2 * cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.layers = [KVCacheLayer(_storage(shape, dtype, block_size)) for _ in range(cfg.num_layers)]
        # A min-heap of free blocks that hold no cached prefix: the lowest is handed out first, so without
        # prefix caching the pages ever touched stay as few as the peak number of blocks in use
        self._free = list(range(1, num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # cached block -> its prefix hash
        self._block_of: dict[bytes, int] = {}  # prefix hash -> cached block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused: least recently freed first
        self.num_queried_tokens = 0  # prefix-cache lookups and hits, in tokens (as vLLM counts them)
        self.num_hit_tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(layer.kv.numel() * layer.kv.element_size() for layer in self.layers)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def capacity_tokens(self) -> int:
        return self.num_usable_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_of)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def reset(self) -> None:
        """Every block free again, nothing cached, block 0 zeroed: what a restart after a failed step starts
        from (a step that raised may have left any block half written)."""
        self._free = list(range(1, self.num_blocks))
        self._refs = [0] * self.num_blocks
        self._hash_of.clear()
        self._block_of.clear()
        self._evictable.clear()
        for layer in self.layers:
            layer.kv[:, : self.block_size].zero_()

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_table))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req, num_new_tokens) <= self.num_free_blocks

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(req, num_new_tokens)):
            block = self._take()
            self._refs[block] = 1
            req.block_table.append(block)

    def _take(self) -> int:
        """A block for new tokens: the lowest free one, else the least recently freed cached one. Cached
        blocks thus fill the budget before any is evicted: resident memory grows to `kv_cache_memory` as
        the cache fills, and no further."""
        if self._free:
            return heapq.heappop(self._free)
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block

    def free(self, req: Request) -> None:
        # Last block first: of one request's blocks, the end of its sequence is the least likely to be
        # wanted again (another request shares a prefix, not a suffix), so it is evicted first
        for block in reversed(req.block_table):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                heapq.heappush(self._free, block)
        req.block_table = []

    # ---- prefix caching --------------------------------------------------------------------------

    def cached_prefix(self, req: Request) -> list[int]:
        """The blocks holding the longest cached prefix of `req`'s tokens, leaving at least its last token
        to compute (its logits are needed). Not yet taken: see `take`."""
        if not self.prefix_caching:
            return []
        usable = (req.num_tokens - 1) // self.block_size
        blocks = []
        for h in prefix_hashes(req, self.block_size)[:usable]:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def take(self, req: Request, blocks: Sequence[int]) -> None:
        """Start `req` from cached `blocks`: it shares them, and computes only what follows."""
        for block in blocks:
            self._refs[block] += 1
            self._evictable.pop(block, None)
        req.block_table = list(blocks)
        req.num_computed_tokens = len(blocks) * self.block_size

    def cache_full_blocks(self, req: Request, computed_before: int) -> None:
        """Make the blocks that `req` filled since `computed_before` tokens findable by their prefix."""
        if not self.prefix_caching:
            return
        first, end = computed_before // self.block_size, req.num_computed_tokens // self.block_size
        if end <= first:
            return
        hashes = prefix_hashes(req, self.block_size)
        for i in range(first, end):
            block, h = req.block_table[i], hashes[i]
            if h not in self._block_of and block not in self._hash_of:
                self._block_of[h] = block
                self._hash_of[block] = h


def prefix_hashes(req: Request, block_size: int) -> list[bytes]:
    """The hash of each full block of `req`'s known tokens, each chaining its parent's (extended in place
    as tokens arrive). BLAKE2b, not Python's hash(): a client must not be able to craft a prompt whose
    block collides with another client's and read the KV it did not compute."""
    hashes = req.block_hashes
    n_full = req.num_tokens // block_size
    if len(hashes) < n_full:
        tokens = req.all_token_ids()
        parent = hashes[-1] if hashes else b""
        for i in range(len(hashes), n_full):
            chunk = array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes()
            parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
            hashes.append(parent)
    return hashes


def _storage(shape: tuple[int, ...], dtype: torch.dtype, block_size: int) -> torch.Tensor:
    """Block 0 zeroed; the rest left unwritten, its pages mapped by the OS as blocks are first written."""
    t = torch.empty(shape, dtype=dtype)
    t[:, :block_size].zero_()
    return t
