"""Llama-family decoders: Llama (SmolLM2, TinyLlama, Llama 3.x), Mistral (sliding window), Qwen2 (q/k/v
bias), Qwen3 (RMSNorm on each query and key head).

Q/K/V and gate/up projections are fused into one matmul each; the loader splits checkpoint tensors
into them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from tricklm.model import registry
from tricklm.model.attention import AttentionMetadata, KVCacheLayer, paged_attention
from tricklm.model.base import CausalLM
from tricklm.model.config import ModelConfig
from tricklm.model.layers import (
    RMSNorm,
    RopeSpec,
    RotaryEmbedding,
    activation,
    apply_rotary_,
    load_shard,
    output_logits,
)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.attention_scale
        self.window = cfg.window(layer)
        self.softcap = cfg.attn_logit_softcapping
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def shard_offsets(self) -> dict[str, int]:
        return {"q_proj": 0, "k_proj": self.q_size, "v_proj": self.q_size + self.kv_size}

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        cache: KVCacheLayer,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, self.q_size : self.q_size + self.kv_size].view(t, self.num_kv_heads, self.head_dim))
            qkv = torch.cat([q.view(t, -1), k.view(t, -1), qkv[:, self.q_size + self.kv_size :]], dim=1)
        # q and k heads are adjacent in the fused output: one rotation for both, in place
        apply_rotary_(qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim), cos_sin)
        q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)
        kv = qkv[:, self.q_size :].view(t, 2 * self.num_kv_heads, self.head_dim)
        o = paged_attention(q, kv, cache, meta, self.scale, self.window, self.softcap)
        return self.o_proj(o.reshape(t, self.q_size))  # type: ignore[no-any-return]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)

    def shard_offsets(self) -> dict[str, int]:
        return {"gate_proj": 0, "up_proj": self.intermediate_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)  # type: ignore[no-any-return]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        cache: KVCacheLayer,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))  # type: ignore[no-any-return]


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_class: type[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layer_class(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.rotary_emb = RotaryEmbedding(RopeSpec.of(cfg))
        # Gemma 3's sliding layers rotate with a base of their own
        self.rotary_emb_local = RotaryEmbedding(RopeSpec.of(cfg, local=True)) if cfg.local_rope_theta else None
        self.uses_local_rope = [
            self.rotary_emb_local is not None and cfg.window(i) is not None for i in range(cfg.num_layers)
        ]

    def rotary_tables(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """The step's cos/sin of the global layers, and of the sliding layers where they differ."""
        local = self.rotary_emb_local.lookup(positions, dtype) if self.rotary_emb_local is not None else None
        return self.rotary_emb.lookup(positions, dtype), local

    def run_layers(
        self, x: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCacheLayer], meta: AttentionMetadata
    ) -> torch.Tensor:
        global_rope, local_rope = self.rotary_tables(positions, x.dtype)
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            cos_sin = local_rope if local_rope is not None and self.uses_local_rope[i] else global_rope
            x = layer(x, cos_sin, cache, meta)
        return self.norm(x)  # type: ignore[no-any-return]


class LlamaForCausalLM(CausalLM):
    """Tokens in (flattened across the batch), hidden states out; `compute_logits` on chosen rows."""

    family = registry.LLAMA
    layer_class: type[nn.Module] = LlamaDecoderLayer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.model = LlamaBody(cfg, self.layer_class)
        self.lm_head: nn.Module | None = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCacheLayer],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model.run_layers(self.embed(input_ids), positions, kv_caches, meta)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens' input vectors (the native decode step starts from these too)."""
        return self.model.embed_tokens(input_ids)  # type: ignore[no-any-return]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return output_logits(hidden, self.lm_head, self.model.embed_tokens)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.family.norm_offset:
            weights = _norm_scales(weights, self.family.norm_offset)
        params = dict(self.named_parameters())
        rows_seen: dict[str, int] = {}
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.lm_head is None and name == "lm_head.weight"):
                continue
            target, offset = self.map_name(name)
            if target not in params:
                continue
            load_shard(params[target], tensor, offset, exact=offset is None)
            rows_seen[target] = rows_seen.get(target, 0) + (tensor.shape[0] if tensor.dim() else 1)
        # a fused parameter counts as loaded only once all its rows arrived (from its parts, or whole: Phi-3)
        return {n for n, rows in rows_seen.items() if rows >= params[n].shape[0]}

    def map_name(self, name: str) -> tuple[str, int | None]:
        """q/k/v and gate/up parts go to rows of our fused qkv_proj and gate_up_proj."""
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                fused = "qkv_proj" if part.endswith(("q_proj", "k_proj", "v_proj")) else "gate_up_proj"
                owner = self.get_submodule(".".join(parts[:i]))
                assert isinstance(owner, LlamaAttention | LlamaMLP)
                return ".".join([*parts[:i], fused, *parts[i + 1 :]]), owner.shard_offsets()[part]
        return name, None


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding attention window (read from config)."""

    family = registry.MISTRAL


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with biases on q/k/v."""

    family = registry.QWEN2


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with an RMSNorm on every query and key head, before the rotation."""

    family = registry.QWEN3


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama with q/k/v and gate/up already fused in the checkpoint, and rotary on part of each head (from
    config)."""

    family = registry.PHI3


def _norm_scales(weights: Iterable[tuple[str, torch.Tensor]], offset: float) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint norm weights w as the scales (offset + w) that `RMSNorm` multiplies by (the family spec's
    `norm_offset`: Gemma stores scale - 1)."""
    for name, tensor in weights:
        yield name, tensor + offset if name.endswith("norm.weight") else tensor
