"""RoPE tables against transformers' own `ROPE_INIT_FUNCTIONS`, for every scaling type we accept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tiny_models import make_tiny_model
from tricklm.config import EngineConfig
from tricklm.engine.core import EngineCore
from tricklm.engine.request import Request
from tricklm.engine.sampling_params import SamplingParams
from tricklm.model.config import ModelConfig, ModelLoadError
from tricklm.model.layers import RopeSpec, rope_frequencies
from tricklm.model.weights.loader import load_model

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HEAD_DIM, MAX_POSITIONS, ORIGINAL = 16, 256, 64
SCALINGS: dict[str, dict[str, Any]] = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 16,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
        "long_factor": [2.0, 2.5, 3.0, 5.0, 7.0, 9.0, 12.0, 16.0],
        "original_max_position_embeddings": ORIGINAL,
    },
}


def hf_config(scaling: dict[str, Any]) -> Any:
    return transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={**scaling, "rope_theta": 10000.0},
    )


def ours(scaling: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict({**hf_config(scaling).to_dict(), "architectures": ["LlamaForCausalLM"]})


@pytest.mark.parametrize("name", list(SCALINGS))
def test_tables_match_transformers(name: str) -> None:
    scaling = SCALINGS[name]
    angles, factor = rope_frequencies(RopeSpec.of(ours(scaling)))
    assert angles.shape == (MAX_POSITIONS, HEAD_DIM // 2)
    init = ROPE_INIT_FUNCTIONS[scaling["rope_type"]]
    inv, hf_factor = init(hf_config(scaling), None)
    assert factor == pytest.approx(hf_factor)
    positions = torch.arange(MAX_POSITIONS, dtype=torch.float32)
    if name == "longrope":  # short factors inside the original context, long ones past it
        long_inv, _ = init(hf_config(scaling), None, seq_len=ORIGINAL + 1)
        torch.testing.assert_close(angles[:ORIGINAL], torch.outer(positions[:ORIGINAL], inv))
        torch.testing.assert_close(angles[ORIGINAL:], torch.outer(positions[ORIGINAL:], long_inv))
        assert not torch.allclose(inv, long_inv)
    else:
        torch.testing.assert_close(angles, torch.outer(positions, inv))


def test_a_yarn_model_matches_transformers(tmp_path: Path) -> None:
    """The attention factor folded into cos/sin, through the whole model."""
    path = make_tiny_model(tmp_path / "yarn", "LlamaForCausalLM", rope_scaling=SCALINGS["yarn-mscale"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    prompt = list(range(3, 40))
    core = EngineCore(load_model(path), EngineConfig(native_decode=False))
    core.add_request(Request("r", prompt, SamplingParams(max_tokens=1), 1))
    logits = core.runner.forward_logits(core.scheduler.schedule())
    with torch.inference_mode():
        expected = hf(torch.tensor([prompt])).logits[0]
    assert (logits - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["dynamic", "frog"])
def test_unknown_scaling_types_are_refused_at_load(kind: str) -> None:
    cfg = {**hf_config({}).to_dict(), "architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": kind}}
    del cfg["rope_parameters"]
    with pytest.raises(ModelLoadError, match=f"unsupported rope scaling type '{kind}'"):
        ModelConfig.from_dict(cfg)
