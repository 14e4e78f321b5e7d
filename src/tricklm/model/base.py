"""The model contract: what the loader, the quantizer, the engine and the native decode path rely on.

A model is a plain `nn.Module` (tensors in, hidden states out) built from a `ModelConfig` on the meta
device, filled by `load_weights`, and asked for logits on chosen rows only. Every architecture in
`registry.py` derives from `CausalLM` and declares its family's spec (`family`, a `registry.Family`); nothing
else about a model is assumed outside its own file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from tricklm.model.attention import AttentionMetadata, KVCacheLayer
from tricklm.model.config import ModelConfig
from tricklm.model.family import Family


class CausalLM(nn.Module, ABC):
    family: ClassVar[Family]  # what sets the family apart (registry.py); each concrete class names its own
    config: ModelConfig
    # The output projection; None while it is the embedding table (tied). The quantizer may set one.
    lm_head: nn.Module | None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCacheLayer],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] of a step's tokens (flattened across its sequences); writes
        each layer's K/V into `kv_caches` at `meta.slot_mapping`."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().__call__(*args, **kwargs)  # type: ignore[no-any-return]  # nn.Module's is untyped

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] of the rows of `hidden` that are sampled."""

    @abstractmethod
    def get_input_embeddings(self) -> nn.Module:
        """The token table (an `nn.Embedding` until the quantizer swaps it)."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) in; returns the parameters now fully loaded."""

    def map_name(self, name: str) -> tuple[str, int | None]:
        """Checkpoint name -> (our parameter name, row offset inside a fused parameter, or None)."""
        return name, None
