"""Compact weights: close to the float model on every path, 4-bit only where it is exact, and the
default model still knows its capitals."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from agreement import Agreement, margin_of
from tricklm.config import EngineConfig
from tricklm.engine.llm import LLM
from tricklm.model.weights import quant
from tricklm.model.weights.modes import WeightFormat
from tricklm.model.weights.quant import (
    DENSE_DTYPE,
    FBGEMM_K_BLOCK,
    INT4_GROUP,
    MAX_PACKED_ROWS,
    Fp16Weight,
    HalfEmbedding,
    HalfLinear,
    Int4Weight,
    fbgemm_available,
    large_step_format,
    model_dtypes,
    quantize,
)

needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="fbgemm (x86 with AVX2) is needed for packed fp16")

# The compact modes round activations to bfloat16 or fp16 at every projection: against float32, the default
# model's logits move by ~0.25 (test_native's teacher-forced measurement), so two tokens this close may swap
COMPACT_MARGIN = 0.5


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


@needs_fbgemm
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


@needs_fbgemm
def test_without_the_dense_copy_every_step_reads_the_packed_weights() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = HalfLinear(linear.weight, linear.bias, dense=False)
    assert q.weight_dense is None and q.bias_dense is None
    x = torch.randn(4 * MAX_PACKED_ROWS, 64)
    out = q(x)
    assert torch.equal(out, torch.ops.quantized.linear_dynamic_fp16(x, q.packed))
    assert relative_error(out, linear(x)) < 1e-3


def four_bit_weight(rows: int, cols: int) -> torch.Tensor:
    """Weights as a Q4_1 GGUF stores them: per group of 32, levels 0..15 of `scale * level + minimum`,
    the group's smallest weight on level 0 and its largest on 15."""
    levels = torch.randint(0, 16, (rows, cols // INT4_GROUP, INT4_GROUP)).float()
    levels[..., 0], levels[..., -1] = 0, 15
    scale = torch.rand(rows, cols // INT4_GROUP, 1) * 0.01 + 0.001
    minimum = -8 * scale + torch.randn(rows, cols // INT4_GROUP, 1) * 0.01
    return (levels * scale + minimum).view(rows, cols)


def test_four_bit_weights_take_the_int4_kernel_and_stay_close() -> None:
    torch.manual_seed(0)
    weight, bias = four_bit_weight(96, 128), torch.randn(96)
    q = HalfLinear(weight.half(), bias, int4=True)  # the loader stages weights in float16
    assert q.int4 is not None and q.packed is None
    for rows in (1, MAX_PACKED_ROWS):
        x = torch.randn(rows, 128)
        out = q(x)
        assert out.dtype == torch.float32 and out.shape == (rows, 96)
        assert relative_error(out, nn.functional.linear(x, weight, bias)) < 1e-2


def test_weights_that_are_not_four_bit_keep_fp16() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    assert Int4Weight.from_exact(linear.weight, None) is None
    almost = four_bit_weight(64, 128)
    group = almost[3, :INT4_GROUP]
    almost[3, 7] += 0.37 * float(group.max() - group.min()) / 15  # a third of a step off its level
    assert Int4Weight.from_exact(almost, None) is None
    narrow = 1 + 0.01 * torch.randn(64, 128)  # close to its 16 levels in absolute terms, not on them
    assert Int4Weight.from_exact(narrow, None) is None
    broken = four_bit_weight(64, 128)
    broken[0, 0] = float("nan")
    assert Int4Weight.from_exact(broken, None) is None
    q = HalfLinear(linear.weight, linear.bias, int4=True)
    assert q.int4 is None and (q.packed is not None or not fbgemm_available())


def test_four_bit_projection_still_prefills_on_the_bfloat16_copy() -> None:
    torch.manual_seed(0)
    weight = four_bit_weight(32, 64)
    q = HalfLinear(weight, None, int4=True)
    x = torch.randn(MAX_PACKED_ROWS + 1, 64)
    assert torch.equal(q(x), nn.functional.linear(x.to(DENSE_DTYPE), weight.to(DENSE_DTYPE)).float())


@needs_fbgemm
def test_four_bit_projection_can_prefill_on_an_unpadded_fp16_copy() -> None:
    torch.manual_seed(0)
    k = FBGEMM_K_BLOCK + 3 * INT4_GROUP  # a block to pack and a float32 remainder, like 576 inputs
    weight, bias = four_bit_weight(48, k), torch.randn(48)
    q = HalfLinear(weight, bias, int4=True, prefill="fp16")
    assert q.int4 is not None and q.weight_dense is None and q.prefill_copy is not None
    assert q.prefill_copy.split == FBGEMM_K_BLOCK and q.prefill_copy.rest is not None
    assert q.prefill_copy.rest.shape == (48, k - FBGEMM_K_BLOCK) and q.prefill_copy.rest.dtype == torch.float32
    x = torch.randn(MAX_PACKED_ROWS + 1, k)
    out = q(x)
    assert torch.equal(out, q.prefill_copy.matmul(x))
    assert relative_error(out, nn.functional.linear(x, weight, bias)) < 1e-3  # fp16 weights, float32 inputs
    small = x[:MAX_PACKED_ROWS]
    assert torch.equal(q(small), q.int4.matmul(small))  # decode steps still read the 4-bit weights


@needs_fbgemm
def test_fp16_copy_of_a_narrow_weight_is_packed_whole() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    copy = Fp16Weight(weight, None)
    assert copy.split == 64 and copy.rest is None
    x = torch.randn(20, 64)
    assert relative_error(copy.matmul(x), x @ weight.t()) < 1e-3


@needs_fbgemm
def test_fp16_prefill_needs_no_copy_when_the_decode_weights_are_fp16() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = HalfLinear(linear.weight.half(), linear.bias, prefill="fp16")
    assert q.packed is not None and q.prefill_copy is None and q.weight_dense is None
    x = torch.randn(4 * MAX_PACKED_ROWS, 64)
    assert torch.equal(q(x), torch.ops.quantized.linear_dynamic_fp16(x, q.packed))


@pytest.mark.parametrize("fbgemm", [True, False] if fbgemm_available() else [False])
def test_every_weight_combination_serves_small_and_large_steps(monkeypatch: pytest.MonkeyPatch, fbgemm: bool) -> None:
    monkeypatch.setattr(quant, "fbgemm_available", lambda: fbgemm)
    torch.manual_seed(0)
    k = FBGEMM_K_BLOCK + INT4_GROUP
    weight, bias = four_bit_weight(24, k), torch.randn(24)
    steps = (torch.randn(2, k), torch.randn(MAX_PACKED_ROWS + 3, k))
    for packed, dense, int4, prefill, dtype in itertools.product(
        (True, False), (True, False), (True, False), ("bf16", "fp16"), (torch.float32, DENSE_DTYPE)
    ):
        setting = (packed, dense, int4, prefill, dtype)
        q = HalfLinear(weight.to(dtype), bias, packed=packed, dense=dense, int4=int4, prefill=prefill)
        assert q.prefill_copy is None or q.weight_dense is None, setting  # never two copies
        if dtype == DENSE_DTYPE:
            assert q.prefill_copy is None, setting  # a bfloat16 weight is its own copy
        for x in steps:
            out = q(x)
            assert out.shape == (len(x), 24) and out.dtype == torch.float32, setting
            assert relative_error(out, nn.functional.linear(x, weight.to(dtype).float(), bias)) < 1e-2, setting


def test_prefill_format_is_measured_once_and_rejected_when_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    timer = quant._best_seconds
    monkeypatch.setattr(quant, "_best_seconds", lambda ops: calls.append(len(ops)) or timer(ops))
    large_step_format.cache_clear()
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    expected = torch.rand(1)
    torch.manual_seed(1234)
    first = large_step_format()
    assert first in ("bf16", "fp16") or not fbgemm_available()
    assert torch.equal(torch.rand(1), expected)  # the caller's random stream is left alone
    assert large_step_format() == first and calls == ([2] if fbgemm_available() else [])  # timed once
    assert torch.get_num_threads() == threads  # timed on one thread, then given back
    with pytest.raises(ValueError, match="bf16, fp16"):
        HalfLinear(torch.randn(8, 8), None, prefill="int8")
    with pytest.raises(ValueError, match="auto, bf16, fp16"):
        quantize(TinyTied(), "int4", prefill="int8")
    with pytest.raises(ValueError, match="prefill_weights"):
        EngineConfig(prefill_weights="int8")


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
    model = quantize(TinyTied(), "int4")  # random weights are not 4-bit: packed fp16 and a prefill copy
    assert isinstance(model.mlp["up"], HalfLinear) and isinstance(model.mlp["down"], HalfLinear)
    assert isinstance(model.embed, HalfEmbedding) and isinstance(model.lm_head, HalfLinear)
    assert model.lm_head.weight_dense.data_ptr() == model.embed.weight.data_ptr()  # shared, not copied
    assert model.embed(torch.tensor([3, 4])).dtype == torch.float32
    assert model.norm.weight.dtype == torch.float32
    assert model_dtypes(model) == (torch.float32, torch.float16)


@needs_fbgemm
def test_quantize_without_dense_copies_keeps_only_the_free_one() -> None:
    model = quantize(TinyTied(), "fp16-only")
    assert model.mlp["up"].weight_dense is None and model.mlp["down"].weight_dense is None
    assert model.lm_head.weight_dense.data_ptr() == model.embed.weight.data_ptr()  # the table itself


def test_quantize_rejects_an_unknown_or_retired_format() -> None:
    with pytest.raises(ValueError, match="none, int4, fp16-only, gguf"):
        quantize(TinyTied(), "int3")
    with pytest.raises(ValueError, match="fp16 was retired: int4 keeps"):
        quantize(TinyTied(), "fp16")
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize(TinyTied(), WeightFormat.NONE)


def test_default_model_compact_greedy_matches_float() -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,", "The largest planet in the solar system is"]
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    fp32 = LLM(quantization="none", max_num_seqs=4)
    # the batched prompts make one step of more than MAX_PACKED_ROWS tokens: it reads the prefill copy
    settings = [("int4", "bf16"), ("int4", "fp16"), ("fp16-only", "auto")]
    compact = {s: LLM(quantization=s[0], prefill_weights=s[1], max_num_seqs=4) for s in settings}
    try:
        model = compact["int4", "fp16"].engine.core.runner.model
        assert model_dtypes(model) == (torch.float32, torch.float16)  # type: ignore[arg-type]
        projections = [m for m in model.modules() if isinstance(m, HalfLinear)]  # type: ignore[attr-defined]
        # the GGUF's Q4_1 projections are found exact; the head (not 4-bit at source) stays fp16
        assert sum(m.int4 is not None for m in projections) == len(projections) - 1
        assert model.lm_head.int4 is None  # type: ignore[union-attr]
        if fbgemm_available():
            assert all(m.prefill_copy is not None for m in projections if m.int4 is not None)
        expected = fp32.generate(prompts, max_tokens=8, temperature=0.0, logprobs=2)
        agreement = Agreement(COMPACT_MARGIN)
        for setting, llm in compact.items():
            got = llm.generate(prompts, max_tokens=8, temperature=0.0, logprobs=2)
            for ours, want in zip(got, expected, strict=True):
                margins = ([margin_of(lp["top"]) for lp in r["logprobs"]] for r in (ours, want))
                agreement.check(ours["token_ids"], want["token_ids"], *margins, what=f"{setting}: {want['text']!r}")
            answer = llm.generate(chat, max_tokens=10, temperature=0.0)
            assert "Paris" in got[0]["text"] and "Paris" in answer["text"], setting
        agreement.assert_meaningful()
    finally:
        fp32.shutdown()
        for llm in compact.values():
            llm.shutdown()
