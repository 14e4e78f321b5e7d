"""fp16 weights: close to the float model on both paths, and the default model still knows its capitals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tricklm.engine.llm import LLM
from tricklm.model.quant import (
    DENSE_DTYPE,
    MAX_PACKED_ROWS,
    HalfEmbedding,
    HalfLinear,
    fbgemm_available,
    model_dtypes,
    quantize_fp16,
)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


@pytest.mark.skipif(not fbgemm_available(), reason="fbgemm (x86 with AVX2) is needed for packed fp16")
def test_packed_path_is_close_to_float() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 512)
    q = HalfLinear(linear.weight, linear.bias)
    assert q.packed is not None
    for rows in (1, MAX_PACKED_ROWS):
        x = torch.randn(rows, 256)
        assert relative_error(q(x), linear(x)) < 1e-3


def test_many_rows_use_the_bfloat16_copy() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = HalfLinear(linear.weight, linear.bias)
    x = torch.randn(MAX_PACKED_ROWS + 1, 64)
    expected = nn.functional.linear(x.to(DENSE_DTYPE), linear.weight.to(DENSE_DTYPE), linear.bias.to(DENSE_DTYPE))
    out = q(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected.float())
    assert relative_error(out, linear(x)) < 1e-2


@pytest.mark.skipif(not fbgemm_available(), reason="fbgemm (x86 with AVX2) is needed for packed fp16")
def test_without_the_dense_copy_every_step_reads_the_packed_weights() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = HalfLinear(linear.weight, linear.bias, dense=False)
    assert q.weight_dense is None and q.bias_dense is None
    x = torch.randn(4 * MAX_PACKED_ROWS, 64)
    out = q(x)
    assert torch.equal(out, torch.ops.quantized.linear_dynamic_fp16(x, q.packed))
    assert relative_error(out, linear(x)) < 1e-3


class TinyTied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.mlp = nn.ModuleDict({"up": nn.Linear(8, 16), "down": nn.Linear(16, 8)})
        self.norm = nn.LayerNorm(8)
        self.lm_head: nn.Module | None = None

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


def test_quantize_swaps_every_projection_and_ties_the_head_to_the_table() -> None:
    model = quantize_fp16(TinyTied())
    assert isinstance(model.mlp["up"], HalfLinear) and isinstance(model.mlp["down"], HalfLinear)
    assert isinstance(model.embed, HalfEmbedding) and isinstance(model.lm_head, HalfLinear)
    assert model.lm_head.weight_dense.data_ptr() == model.embed.weight.data_ptr()  # shared, not copied
    assert model.embed(torch.tensor([3, 4])).dtype == torch.float32
    assert model.norm.weight.dtype == torch.float32
    assert model_dtypes(model) == (torch.float32, torch.float16)


@pytest.mark.skipif(not fbgemm_available(), reason="fbgemm (x86 with AVX2) is needed for packed fp16")
def test_quantize_without_dense_copies_keeps_only_the_free_one() -> None:
    model = quantize_fp16(TinyTied(), dense=False)
    assert model.mlp["up"].weight_dense is None and model.mlp["down"].weight_dense is None
    assert model.lm_head.weight_dense.data_ptr() == model.embed.weight.data_ptr()  # the table itself


def test_default_model_fp16_greedy_matches_float() -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,", "The largest planet in the solar system is"]
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    fp32 = LLM(quantization="none", max_num_seqs=4)
    fp16 = LLM(quantization="fp16", max_num_seqs=4)
    lean = LLM(quantization="fp16-only", max_num_seqs=4)
    try:
        assert model_dtypes(fp16.engine.core.runner.model) == (torch.float32, torch.float16)  # type: ignore[arg-type]
        a = fp32.generate(prompts, max_tokens=8, temperature=0.0)
        b = fp16.generate(prompts, max_tokens=8, temperature=0.0)
        c = lean.generate(prompts, max_tokens=8, temperature=0.0)
        answer = fp16.generate(chat, max_tokens=10, temperature=0.0)
    finally:
        fp32.shutdown()
        fp16.shutdown()
        lean.shutdown()
    assert "Paris" in b[0]["text"] and "Paris" in answer["text"]
    expected = [r["token_ids"] for r in a]
    assert [r["token_ids"] for r in b] == expected
    assert [r["token_ids"] for r in c] == expected
