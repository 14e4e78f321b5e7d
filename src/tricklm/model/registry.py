"""Architecture name (config.json `architectures[0]`) -> model class."""

from __future__ import annotations

from tricklm.model.base import CausalLM as CausalLM
from tricklm.model.config import ModelConfig, ModelLoadError
from tricklm.model.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from tricklm.model.gpt2 import GPT2LMHeadModel
from tricklm.model.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}


def model_class(cfg: ModelConfig) -> type[CausalLM]:
    cls = MODEL_REGISTRY.get(cfg.architecture)
    if cls is None:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ModelLoadError(f"architecture {cfg.architecture!r} is not supported (supported: {supported})")
    return cls
