"""The KV cache: allocated once from a memory budget, handed out to requests in fixed-size blocks."""

from __future__ import annotations

import heapq

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
    first write, and resident memory grows with the tokens actually cached, not with the budget.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache budget is too small for even one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (2 * cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.layers = [KVCacheLayer(_storage(shape, dtype, block_size)) for _ in range(cfg.num_layers)]
        # A min-heap: always hand out the lowest free block, so the pages ever touched stay as few as the
        # peak number of blocks in use (resident memory stays flat across requests).
        self._free = list(range(1, num_blocks))

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
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def reset(self) -> None:
        """Every block free again and block 0 zeroed: what a restart after a failed step starts from."""
        self._free = list(range(1, self.num_blocks))
        for layer in self.layers:
            layer.kv[:, : self.block_size].zero_()

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_table))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req, num_new_tokens) <= len(self._free)

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(req, num_new_tokens)):
            req.block_table.append(heapq.heappop(self._free))

    def free(self, req: Request) -> None:
        for block in req.block_table:
            heapq.heappush(self._free, block)
        req.block_table = []


def _storage(shape: tuple[int, ...], dtype: torch.dtype, block_size: int) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    t[:, :block_size].zero_()
    return t
