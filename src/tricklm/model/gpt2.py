"""GPT-2: learned positions, LayerNorm, fused c_attn, Conv1D weights stored as [in, out]."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tricklm.model import registry
from tricklm.model.attention import AttentionMetadata, KVCacheLayer, paged_attention
from tricklm.model.base import CausalLM
from tricklm.model.config import ModelConfig
from tricklm.model.layers import activation, load_shard, output_logits

# Conv1D layers keep weights transposed relative to nn.Linear.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, cache: KVCacheLayer, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.c_attn(x).view(t, 3 * self.num_heads, self.head_dim)
        o = paged_attention(qkv[:, : self.num_heads], qkv[:, self.num_heads :], cache, meta, self.scale)
        return self.c_proj(o.reshape(t, -1))  # type: ignore[no-any-return]


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))  # type: ignore[no-any-return]


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCacheLayer, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, meta)
        return x + self.mlp(self.ln_2(x))  # type: ignore[no-any-return]


class GPT2Body(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class GPT2LMHeadModel(CausalLM):
    family = registry.GPT2

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.transformer = GPT2Body(cfg)
        self.lm_head: nn.Module | None = None  # tied to wte unless quantisation gives it its own copy

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCacheLayer],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        for block, cache in zip(t.h, kv_caches, strict=True):
            x = block(x, cache, meta)
        return t.ln_f(x)  # type: ignore[no-any-return]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return output_logits(hidden, self.lm_head, self.transformer.wte)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = name if name.startswith("transformer.") else f"transformer.{name}"
            if target not in params:
                continue  # lm_head (tied) and the causal-mask buffers old checkpoints carry
            if target.endswith(_CONV1D):
                tensor = tensor.t()
            load_shard(params[target], tensor, None, exact=True)
            loaded.add(target)
        return loaded
