"""Every model family we run, as a spec (`family.py`), and the class that runs it.

A new Llama-like architecture is a `Family` here and a class in `llama.py` that names it; the config
reader, the GGUF reader and the native step find it through `family()` / `gguf_family()`. Torch-free:
the class is imported only by `model_class`, when a model is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tricklm.model.family import Family, ModelLoadError, SlidingLayers

if TYPE_CHECKING:
    from tricklm.model.base import CausalLM


def _gemma_gguf_keys(get: Any, config: dict[str, Any], factors: dict[str, list[float]]) -> dict[str, Any]:
    """What llama.cpp's Gemma 2/3 graphs assume besides the file's keys."""
    heads, hidden, head_dim = config["num_attention_heads"], config["hidden_size"], config.get("head_dim")
    # llama.cpp scales queries by head_dim, except in the 27B models (46 or 62 layers): hidden / heads
    is_27b = config["num_hidden_layers"] in (46, 62)
    extra: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": hidden // heads if is_27b else head_dim or hidden // heads,
        "sliding_window": get("attention.sliding_window"),
        "attn_logit_softcapping": get("attn_logit_softcapping"),
        "final_logit_softcapping": get("final_logit_softcapping"),
    }
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one flag a layer: True where it slides
        extra["layer_types"] = ["sliding_attention" if f else "full_attention" for f in pattern]
    elif pattern is not None:
        extra["sliding_window_pattern"] = int(pattern)
    if get("rope.freq_base_swa") is not None:
        extra["rope_local_base_freq"] = float(get("rope.freq_base_swa"))
    return {k: v for k, v in extra.items() if v is not None}


def _phi3_gguf_keys(get: Any, config: dict[str, Any], factors: dict[str, list[float]]) -> dict[str, Any]:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    extra: dict[str, Any] = {
        "partial_rotary_factor": int(get("rope.dimension_count", head_dim)) / head_dim,
        "sliding_window": get("attention.sliding_window"),
    }
    if factors:
        original = int(get("rope.scaling.original_context_length", config["max_position_embeddings"]))
        extra["rope_scaling"] = {"rope_type": "longrope", **factors, "original_max_position_embeddings": original}
        if get("rope.scaling.attn_factor") is not None:
            extra["rope_scaling"]["attention_factor"] = float(get("rope.scaling.attn_factor"))
    return {k: v for k, v in extra.items() if v is not None}


# llama.cpp's names for Gemma's four norms a layer
_GEMMA_TENSORS = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

LLAMA = Family("LlamaForCausalLM", "llama:LlamaForCausalLM", gguf_architecture="llama", gguf_qk_interleaved=True)
MISTRAL = Family("MistralForCausalLM", "llama:MistralForCausalLM")
QWEN2 = Family(
    "Qwen2ForCausalLM",
    "llama:Qwen2ForCausalLM",
    gguf_architecture="qwen2",
    attention_bias=True,
    sliding_layers=SlidingLayers.FROM_MAX_WINDOW_LAYERS,
)
QWEN3 = Family(
    "Qwen3ForCausalLM",
    "llama:Qwen3ForCausalLM",
    gguf_architecture="qwen3",
    qk_norm=True,
    sliding_layers=SlidingLayers.FROM_MAX_WINDOW_LAYERS,
)
GEMMA2 = Family(
    "Gemma2ForCausalLM",
    "gemma:Gemma2ForCausalLM",
    gguf_architecture="gemma2",
    tied_by_default=True,
    norm_offset=1.0,
    sliding_layers=SlidingLayers.ALL_BUT_EVERY_NTH,
    global_every=2,
    gemma_attention=True,
    gguf_tensor_names=_GEMMA_TENSORS,
    gguf_keys=_gemma_gguf_keys,
)
GEMMA3 = Family(
    "Gemma3ForCausalLM",
    "gemma:Gemma3ForCausalLM",
    gguf_architecture="gemma3",
    qk_norm=True,
    tied_by_default=True,
    norm_offset=1.0,
    sliding_layers=SlidingLayers.ALL_BUT_EVERY_NTH,
    global_every=6,
    default_rope_theta=1_000_000.0,
    local_rope=True,
    gemma_attention=True,
    gguf_tensor_names=_GEMMA_TENSORS,
    gguf_keys=_gemma_gguf_keys,
)
PHI3 = Family(
    "Phi3ForCausalLM",
    "llama:Phi3ForCausalLM",
    gguf_architecture="phi3",
    gguf_tensor_names={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},  # fused, as in HF
    gguf_keys=_phi3_gguf_keys,
)
GPT2 = Family("GPT2LMHeadModel", "gpt2:GPT2LMHeadModel", config_keys="gpt2", native_step=False)

FAMILIES: dict[str, Family] = {f.architecture: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3, GPT2)}
GGUF_FAMILIES: dict[str, Family] = {f.gguf_architecture: f for f in FAMILIES.values() if f.gguf_architecture}

# Checkpoints whose text model we run, but not packaged with a vision tower
MULTIMODAL = {
    "Gemma3ForConditionalGeneration": "serve its GGUF file (the text model: llama.cpp keeps the vision tower "
    "in a separate mmproj file) or a text-only Gemma3ForCausalLM checkpoint",
}


def family(architecture: str) -> Family:
    """The spec of a config.json architecture; a ModelLoadError naming the supported ones otherwise."""
    if architecture in MULTIMODAL:
        raise ModelLoadError(f"{architecture} is multimodal, which is not supported: {MULTIMODAL[architecture]}")
    spec = FAMILIES.get(architecture)
    if spec is None:
        supported = ", ".join(sorted(FAMILIES))
        raise ModelLoadError(f"architecture {architecture!r} is not supported (supported: {supported})")
    return spec


def gguf_family(name: Any, path: object) -> Family:
    """The spec of a GGUF `general.architecture`; a ModelLoadError naming the supported ones otherwise."""
    spec = GGUF_FAMILIES.get(name) if isinstance(name, str) else None
    if spec is None:
        supported = ", ".join(repr(a) for a in GGUF_FAMILIES)
        raise ModelLoadError(f"{path}: GGUF architecture {name!r} is not supported (supported: {supported})")
    return spec


def model_class(architecture: str) -> type[CausalLM]:
    """The class that runs `architecture` (imports torch and the model code)."""
    spec = family(architecture)
    module, _, name = spec.model_class.partition(":")
    cls: type[CausalLM] = getattr(importlib.import_module(f"tricklm.model.{module}"), name)
    if cls.__dict__.get("family") is not spec:
        raise TypeError(f"{spec.model_class} does not declare the {spec.architecture} family as its own")
    return cls
