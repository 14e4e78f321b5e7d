"""Weight-only int8: close to the float model, and the default model still knows its capitals."""

from __future__ import annotations

import torch
from torch import nn

from tricklm.engine.llm import LLM
from tricklm.model.quant import MAX_INT8_ROWS, Int8Linear, quantize_int8


def test_int8_linear_is_close_to_float() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 512)
    x = torch.randn(7, 256)
    expected = linear(x)
    got = Int8Linear(linear.weight, linear.bias)(x.bfloat16()).float()
    rel = (got - expected).norm() / expected.norm()
    assert rel < 0.02, rel


def test_quantize_replaces_mlp_linears_only() -> None:
    model = nn.ModuleDict(
        {"mlp": nn.ModuleDict({"up": nn.Linear(8, 16), "down": nn.Linear(16, 8)}), "attn": nn.Linear(8, 8)}
    )
    model = quantize_int8(model)
    assert isinstance(model["mlp"]["up"], Int8Linear) and isinstance(model["mlp"]["down"], Int8Linear)
    assert isinstance(model["attn"], nn.Linear) and model["attn"].weight.dtype == torch.bfloat16


def test_int8_linear_uses_the_dense_copy_for_many_rows() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(MAX_INT8_ROWS + 1, 64).bfloat16()
    assert torch.equal(q(x), nn.functional.linear(x, linear.weight.bfloat16(), linear.bias.bfloat16()))


def test_default_model_int8_greedy_matches_float() -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,", "The largest planet in the solar system is"]
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    fp32 = LLM(quantization="none", max_num_seqs=4)
    int8 = LLM(quantization="int8", max_num_seqs=4)
    try:
        a = fp32.generate(prompts, max_tokens=6, temperature=0.0)
        b = int8.generate(prompts, max_tokens=6, temperature=0.0)
        answer = int8.generate(chat, max_tokens=10, temperature=0.0)
    finally:
        fp32.shutdown()
        int8.shutdown()
    assert "Paris" in b[0]["text"] and "Paris" in answer["text"]
    assert [r["token_ids"][0] for r in a] == [r["token_ids"][0] for r in b]
