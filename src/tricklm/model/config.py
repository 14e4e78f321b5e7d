"""The subset of a Hugging Face `config.json` our model code reads, normalised across versions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ModelLoadError(Exception):
    """A model folder or file that cannot be used; the message is meant for the user as one line."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each query and key head before the rotation (Qwen3)
    sliding_window: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not archs:
            raise ModelLoadError("config.json has no 'architectures' entry")
        arch = archs[0]
        try:
            if arch == "GPT2LMHeadModel":
                return cls._gpt2(arch, cfg)
            return cls._llama_like(arch, cfg)
        except KeyError as e:
            raise ModelLoadError(f"config.json for {arch} lacks the field {e}") from None

    @classmethod
    def _llama_like(cls, arch: str, cfg: dict[str, Any]) -> ModelConfig:
        num_heads = cfg["num_attention_heads"]
        rope = _rope_parameters(cfg)
        window = _sliding_window(arch, cfg)
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            hidden_act=cfg.get("hidden_act", "silu"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            rope_theta=float(rope.pop("rope_theta", 10000.0)),
            rope_scaling=rope or None,
            attention_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=window,
            raw=cfg,
        )

    @classmethod
    def _gpt2(cls, arch: str, cfg: dict[str, Any]) -> ModelConfig:
        hidden = cfg["n_embd"]
        heads = cfg["n_head"]
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            num_layers=cfg["n_layer"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=cfg.get("n_inner") or 4 * hidden,
            max_position_embeddings=cfg.get("n_positions", 1024),
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            hidden_act=cfg.get("activation_function", "gelu_new"),
            tie_word_embeddings=True,
            raw=cfg,
        )


def _sliding_window(arch: str, cfg: dict[str, Any]) -> int | None:
    """One window for every layer, or none; models that slide on some layers only are refused."""
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not layer_types:
        if not cfg.get("use_sliding_window", False):
            return None
        first_sliding = cfg.get("max_window_layers", 0)
        layer_types = [
            "full_attention" if i < first_sliding else "sliding_attention" for i in range(cfg["num_hidden_layers"])
        ]
    if layer_types:
        kinds = set(layer_types)
        if kinds == {"full_attention"}:
            return None
        if kinds != {"sliding_attention"}:
            raise ModelLoadError(f"{arch} with sliding attention on some layers only is not supported")
    return int(window) if window else None


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """Merge transformers v4 (`rope_theta` + `rope_scaling`) and v5 (`rope_parameters`) spellings."""
    params: dict[str, Any] = {"rope_theta": cfg.get("rope_theta", 10000.0)}
    for key in ("rope_scaling", "rope_parameters"):
        extra = cfg.get(key)
        if isinstance(extra, dict):
            params.update(extra)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind != "default":
        params["rope_type"] = kind
    return params
