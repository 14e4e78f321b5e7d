"""What sets a model family apart, as data: the spec each model class declares (`family = registry.QWEN3`).

The config reader (`config.py`), the GGUF reader (`weights/gguf_*.py`) and the native step take a family's
differences from its spec in `registry.py` instead of testing architecture names. Torch-free on purpose:
reading a config.json or a GGUF header imports none of the model code.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class ModelLoadError(Exception):
    """A model folder or file that cannot be used; the message is meant for the user as one line."""


class SlidingLayers(enum.Enum):
    """Which layers slide when a config sets `sliding_window` but no `layer_types` (transformers' defaults)."""

    ALL = "all"  # Mistral, Phi-3: one window for every layer
    FROM_MAX_WINDOW_LAYERS = "from_max_window_layers"  # Qwen: layers from `max_window_layers` on, if enabled
    ALL_BUT_EVERY_NTH = "all_but_every_nth"  # Gemma: every n-th layer global (`sliding_window_pattern`)


# (value of `<arch>.KEY` in the GGUF metadata, the config built so far, RoPE factor tensors) -> config entries
GgufKeys = Callable[[Callable[..., Any], dict[str, Any], dict[str, list[float]]], dict[str, Any]]


@dataclass(frozen=True)
class Family:
    architecture: str  # config.json's `architectures[0]`
    model_class: str  # "module:Class" under tricklm.model; imported only when a model is built
    gguf_architecture: str | None = None  # GGUF `general.architecture`, None where llama.cpp has no such file
    config_keys: str = "llama"  # which names config.json uses: "llama" (num_attention_heads, ...) or "gpt2"
    attention_bias: bool = False  # q/k/v biases whatever the config says (Qwen2's configs never say)
    qk_norm: bool = False  # RMSNorm on each query and key head before the rotation
    tied_by_default: bool = False  # `tie_word_embeddings` when the config leaves it out
    norm_offset: float = 0.0  # checkpoints store each RMSNorm scale minus this (Gemma: w means 1 + w)
    sliding_layers: SlidingLayers = SlidingLayers.ALL
    global_every: int = 0  # ALL_BUT_EVERY_NTH without `sliding_window_pattern` in the config
    default_rope_theta: float = 10000.0  # where the config leaves `rope_theta` out
    local_rope: bool = False  # sliding layers rotate with a base of their own, never scaled (Gemma 3)
    gemma_attention: bool = False  # reads `query_pre_attn_scalar` and the attention and logit soft caps
    gguf_tensor_names: Mapping[str, str] = field(default_factory=dict)  # llama.cpp layer names unlike Llama's
    gguf_qk_interleaved: bool = False  # llama.cpp permuted the Q/K rows of this family's files (llama's)
    gguf_keys: GgufKeys | None = None  # config entries read from the family's own GGUF keys
    native_step: bool = True  # the C++ decode stack implements the family's layer

    def layer_types(self, cfg: dict[str, Any]) -> list[str]:
        """`layer_types` as transformers derives it when a config.json predates the field."""
        n = cfg["num_hidden_layers"]
        if cfg.get("layer_types"):
            return list(cfg["layer_types"])
        if self.sliding_layers is SlidingLayers.FROM_MAX_WINDOW_LAYERS:
            if not cfg.get("use_sliding_window", False):
                return ["full_attention"] * n
            first_sliding = cfg.get("max_window_layers", 0)
            return ["full_attention" if i < first_sliding else "sliding_attention" for i in range(n)]
        if self.sliding_layers is SlidingLayers.ALL_BUT_EVERY_NTH:
            every = cfg.get("sliding_window_pattern") or self.global_every
            return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
        return ["sliding_attention"] * n
