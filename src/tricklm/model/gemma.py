"""Gemma 2 and Gemma 3 decoders: the Llama stack with Gemma's differences.

- the token embeddings are scaled by sqrt(hidden) (in the activations' dtype, as transformers does);
- RMSNorm scales by (1 + weight): the loader adds the 1 once, so the plain `RMSNorm` serves;
- a norm after attention and after the MLP as well as before each (four per layer);
- GeGLU (gelu_pytorch_tanh, from config) in the MLP;
- sliding-window layers interleaved with global ones, the attention scale from `query_pre_attn_scalar`;
- Gemma 2: attention scores and final logits soft-capped (cap * tanh(x / cap));
- Gemma 3: RMSNorm on each query and key head; the sliding layers' RoPE has its own base, unscaled.

The differences are declared in each class's spec (`registry.GEMMA2`, `registry.GEMMA3`) and reach the
layers through the config (`ModelConfig`), so the two classes differ only in the spec they name.
"""

from __future__ import annotations

import torch
from torch import nn

from tricklm.model import registry
from tricklm.model.attention import AttentionMetadata, KVCacheLayer
from tricklm.model.config import ModelConfig
from tricklm.model.layers import RMSNorm
from tricklm.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer)
        self.mlp = LlamaMLP(cfg)
        size, eps = cfg.hidden_size, cfg.norm_eps
        self.input_layernorm = RMSNorm(size, eps)
        self.post_attention_layernorm = RMSNorm(size, eps)
        self.pre_feedforward_layernorm = RMSNorm(size, eps)
        self.post_feedforward_layernorm = RMSNorm(size, eps)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        cache: KVCacheLayer,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos_sin, cache, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))  # type: ignore[no-any-return]


class Gemma2ForCausalLM(LlamaForCausalLM):
    family = registry.GEMMA2
    layer_class = GemmaDecoderLayer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)  # type: ignore[no-any-return]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 2 plus per-head q/k norms and a RoPE base of its own on the sliding layers."""

    family = registry.GEMMA3
