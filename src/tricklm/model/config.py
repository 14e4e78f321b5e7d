"""The subset of a Hugging Face `config.json` our model code reads, normalised across versions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tricklm.model.family import Family
from tricklm.model.family import ModelLoadError as ModelLoadError
from tricklm.model.registry import family


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
    qk_norm: bool = False  # RMSNorm on each query and key head before the rotation (Qwen3, Gemma 3)
    # Per layer: its attention window, None where the layer attends to its whole context; () for none at all
    layer_windows: tuple[int | None, ...] = ()
    # RoPE of the sliding layers when it differs from the global layers' (Gemma 3): base, no scaling
    local_rope_theta: float | None = None
    partial_rotary_factor: float = 1.0  # the leading fraction of each head that is rotated (Phi-3)
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power; None: head_dim's
    attn_logit_softcapping: float | None = None  # cap * tanh(score / cap) before the mask (Gemma 2)
    final_logit_softcapping: float | None = None  # the same on the output logits (Gemma 2)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def window(self, layer: int) -> int | None:
        """The attention window of one layer (None: the whole context)."""
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def windows(self) -> frozenset[int | None]:
        """Every distinct window among the layers."""
        return frozenset(self.layer_windows or (None,))

    @property
    def sliding_window(self) -> int | None:
        """The window every layer shares; None when no layer slides. Raises for mixed layers."""
        if len(self.windows) > 1:
            raise ValueError(f"{self.architecture} slides on some layers only: use window(layer)")
        return next(iter(self.windows))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        scalar = self.query_pre_attn_scalar or self.head_dim
        return float(scalar**-0.5)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not archs:
            raise ModelLoadError("config.json has no 'architectures' entry")
        spec = family(archs[0])
        try:
            if spec.config_keys == "gpt2":
                return cls._gpt2(spec.architecture, cfg)
            return cls._llama_like(spec, cfg)
        except KeyError as e:
            raise ModelLoadError(f"config.json for {spec.architecture} lacks the field {e}") from None

    @classmethod
    def _llama_like(cls, spec: Family, cfg: dict[str, Any]) -> ModelConfig:
        num_heads = cfg["num_attention_heads"]
        theta, scaling, partial = _rope_parameters(cfg, "full_attention", spec.default_rope_theta)
        gemma = spec.gemma_attention
        return cls(
            architecture=spec.architecture,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act", "silu"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", spec.tied_by_default),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=spec.attention_bias or bool(cfg.get("attention_bias", False)),
            qk_norm=spec.qk_norm,
            layer_windows=_layer_windows(spec, cfg),
            local_rope_theta=_local_rope_theta(spec, cfg),
            partial_rotary_factor=partial,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if gemma else None,
            attn_logit_softcapping=cfg.get("attn_logit_softcapping") if gemma else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping") if gemma else None,
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


def _layer_windows(spec: Family, cfg: dict[str, Any]) -> tuple[int | None, ...]:
    arch = spec.architecture
    window = cfg.get("sliding_window")
    kinds = spec.layer_types(cfg)
    unknown = set(kinds) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ModelLoadError(f"{arch}: unsupported attention layer types {sorted(unknown)}")
    if len(kinds) != cfg["num_hidden_layers"]:
        raise ModelLoadError(f"{arch}: layer_types has {len(kinds)} entries for {cfg['num_hidden_layers']} layers")
    if not window:
        return ()
    return tuple(int(window) if kind == "sliding_attention" else None for kind in kinds)


def _local_rope_theta(spec: Family, cfg: dict[str, Any]) -> float | None:
    """The base of the sliding layers' rotation, in families where it has its own (never scaled)."""
    if not spec.local_rope:
        return None
    arch = spec.architecture
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):
        local = params["sliding_attention"]
        if (local.get("rope_type") or "default") != "default":
            raise ModelLoadError(f"{arch}: rope scaling on the sliding layers is not supported")
        return float(local.get("rope_theta", 10000.0))
    return float(cfg.get("rope_local_base_freq", 10000.0))


ROPE_SCALING_TYPES = ("linear", "llama3", "yarn", "longrope")  # as transformers computes them (layers.py)
# and "freq_factors", which only our GGUF converter writes: llama.cpp's rope_freqs tensor (a divisor per
# frequency; Llama 3.1+ files hold their llama3 scaling that way)
INTERNAL_ROPE_TYPES = ("freq_factors",)


def _rope_parameters(
    cfg: dict[str, Any], layer_type: str, default_theta: float
) -> tuple[float, dict[str, Any] | None, float]:
    """(base, scaling parameters or None, rotated fraction of a head) of the global layers.

    Merges transformers v4 (`rope_theta` + `rope_scaling`) and v5 (`rope_parameters`, possibly one dict
    per layer type) spellings.
    """
    params: dict[str, Any] = {"rope_theta": cfg.get("rope_theta", default_theta)}
    for key in ("rope_scaling", "rope_parameters"):
        extra = cfg.get(key)
        if isinstance(extra, dict) and isinstance(extra.get(layer_type), dict):
            extra = extra[layer_type]
        if isinstance(extra, dict) and not any(isinstance(v, dict) for v in extra.values()):
            params.update(extra)
    theta = float(params.pop("rope_theta"))
    partial = float(params.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind == "default":
        return theta, None, partial
    if kind not in ROPE_SCALING_TYPES + INTERNAL_ROPE_TYPES:
        supported = ", ".join(ROPE_SCALING_TYPES)
        raise ModelLoadError(f"unsupported rope scaling type {kind!r} (supported: {supported})")
    if "original_max_position_embeddings" in cfg:
        params.setdefault("original_max_position_embeddings", cfg["original_max_position_embeddings"])
    return theta, {"rope_type": kind, **params}, partial
