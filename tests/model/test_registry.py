"""The family registry: each spec names the class that runs it and back, and reading configs needs no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tricklm.model import registry
from tricklm.model.config import ModelConfig, ModelLoadError


@pytest.mark.parametrize("architecture", sorted(registry.FAMILIES))
def test_each_family_names_its_class_and_the_class_declares_it(architecture: str) -> None:
    spec = registry.FAMILIES[architecture]
    cls = registry.model_class(architecture)
    assert cls.__name__ == architecture and cls.__dict__["family"] is spec
    if spec.gguf_architecture:
        assert registry.gguf_family(spec.gguf_architecture, "f.gguf") is spec


def test_unknown_and_multimodal_architectures_are_refused_when_the_config_is_read() -> None:
    with pytest.raises(ModelLoadError, match=r"'FalconForCausalLM' is not supported \(supported: .*Qwen3"):
        ModelConfig.from_dict({"architectures": ["FalconForCausalLM"]})
    with pytest.raises(ModelLoadError, match="multimodal"):
        ModelConfig.from_dict({"architectures": ["Gemma3ForConditionalGeneration"]})
    with pytest.raises(ModelLoadError, match=r"GGUF architecture 'falcon' is not supported \(supported: 'llama'"):
        registry.gguf_family("falcon", "f.gguf")


def test_family_differences_reach_the_config() -> None:
    base = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "sliding_window": 8,
    }
    qwen2 = ModelConfig.from_dict({**base, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.attention_bias and not qwen2.qk_norm and qwen2.layer_windows == (None,) * 4
    gemma3 = ModelConfig.from_dict({**base, "architectures": ["Gemma3ForCausalLM"], "sliding_window_pattern": 2})
    assert gemma3.qk_norm and gemma3.tie_word_embeddings and gemma3.rope_theta == 1_000_000.0
    assert gemma3.layer_windows == (8, None, 8, None) and gemma3.local_rope_theta == 10000.0
    mistral = ModelConfig.from_dict({**base, "architectures": ["MistralForCausalLM"]})
    assert mistral.layer_windows == (8,) * 4 and not mistral.tie_word_embeddings and mistral.local_rope_theta is None


def test_reading_any_family_config_imports_no_torch() -> None:
    code = (
        "import sys; from tricklm.model.config import ModelConfig; from tricklm.model import registry\n"
        "base = dict(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,\n"
        "            n_embd=8, n_layer=1, n_head=2)\n"
        "for arch in registry.FAMILIES: ModelConfig.from_dict({**base, 'architectures': [arch]})\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False"
