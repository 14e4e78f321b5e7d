"""Weight-only int8: close to the float model, and the default model still knows its capitals."""

from __future__ import annotations

import torch
from torch import nn

from tricklm.engine.llm import LLM
from tricklm.model.quant import Int8Linear, quantize_int8


def test_int8_linear_is_close_to_float() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 512)
    x = torch.randn(7, 256)
    expected = linear(x)
    got = Int8Linear(linear.weight, linear.bias)(x.bfloat16()).float()
    rel = (got - expected).norm() / expected.norm()
    assert rel < 0.02, rel


def test_quantize_replaces_every_linear_and_unties_the_head() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.proj = nn.Linear(8, 8)
            self.lm_head: nn.Module | None = None

        def get_input_embeddings(self) -> nn.Embedding:
            return self.emb

    model = quantize_int8(Tiny())
    assert isinstance(model.proj, Int8Linear) and isinstance(model.lm_head, Int8Linear)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model.emb.weight.dtype == torch.bfloat16


def test_default_model_int8_greedy_matches_float() -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,", "The largest planet in the solar system is"]
    fp32 = LLM(max_num_seqs=4)
    int8 = LLM(quantization="int8", max_num_seqs=4)
    try:
        a = fp32.generate(prompts, max_tokens=6, temperature=0.0)
        b = int8.generate(prompts, max_tokens=6, temperature=0.0)
    finally:
        fp32.shutdown()
        int8.shutdown()
    assert "Paris" in b[0]["text"]
    assert [r["token_ids"][0] for r in a] == [r["token_ids"][0] for r in b]
