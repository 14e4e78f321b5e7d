"""The one-copy 4-bit projection: layout round trips, GGUF blocks, and every kernel against a reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from tiny_models import make_tiny_model
from tricklm.model.loader import load_model
from tricklm.model.qlinear import Q4Linear, Q4Weight, load_qmatmul, q4_from_gguf, q4_matmul
from tricklm.model.quant import quantize_q4_1, weight_bytes

SHAPES = [(1, 32), (17, 96), (33, 64), (100, 576), (16, 2048)]  # n not a multiple of 16, k not of 256
ROWS = [1, 3, 4, 5, 16, 17, 64]


def _random_weight(n: int, k: int, seed: int = 0) -> tuple[Q4Weight, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 16, (n, k), generator=gen)
    d = torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3
    m = -8 * d + torch.randn(n, k // 32, generator=gen) * 0.01
    return Q4Weight.from_blocks(levels, d, m), levels


def _kernels() -> list[str]:
    ext = load_qmatmul()
    if ext is None:
        return ["torch"]
    best = ext.isa()
    runnable = {"torch", "scalar", best} | ({"avx2"} if best == "avx512vnni" else set())
    return sorted(runnable)


def _int8_activations(x: torch.Tensor) -> torch.Tensor:
    """What the native kernels multiply by: x rounded to int8 per block of 32, scaled back."""
    rows, k = x.shape
    blocks = x.view(rows, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.where(amax > 0, torch.round(blocks * 127 / amax), torch.zeros_like(blocks))
    return (q * amax / 127).view(rows, k)


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_repacking_round_trips(n: int, k: int) -> None:
    weight, levels = _random_weight(n, k)
    back, d, m = weight.blocks()
    assert torch.equal(back, levels)
    assert weight.shape == (n, k) and d.shape == m.shape == (n, k // 32)


@pytest.mark.parametrize("isa", _kernels())
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_kernels_agree_with_a_reference(isa: str, n: int, k: int) -> None:
    weight, _ = _random_weight(n, k, seed=n + k)
    dense = weight.dequantize()
    for rows in ROWS:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        got = q4_matmul(x, weight, isa)
        # the fallback multiplies float32 activations; the kernels int8 ones, and only their sums differ
        want = x @ dense.t() if isa == "torch" else _int8_activations(x) @ dense.t()
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-5 * scale, (isa, rows)
        # against float activations: int8 rounding, well under a percent
        assert (got - x @ dense.t()).abs().max().item() <= 0.02 * scale


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_blocks_load_as_the_gguf_package_dequantizes_them(qtype: str) -> None:
    values = np.random.default_rng(0).standard_normal((37, 96)).astype(np.float32)
    kind = GGMLQuantizationType[qtype]
    raw = quantize(values, kind)
    weight = q4_from_gguf(raw, qtype)
    assert weight.shape == (37, 96)
    np.testing.assert_array_equal(weight.dequantize().numpy(), dequantize(raw, kind).astype(np.float32))


def test_linear_keeps_leading_dimensions_and_adds_its_bias() -> None:
    weight, _ = _random_weight(40, 64)
    bias = torch.randn(40)
    layer = Q4Linear(weight, bias)
    x = torch.randn(2, 3, 64)
    want = q4_matmul(x.view(6, 64), weight).view(2, 3, 40) + bias
    assert torch.allclose(layer(x), want)


def test_bad_shapes_are_refused() -> None:
    weight, _ = _random_weight(20, 64)
    with pytest.raises(ValueError):
        Q4Weight(weight.levels, weight.d, weight.m, 40)  # more columns than the groups hold
    with pytest.raises(ValueError):
        Q4Weight(weight.levels, weight.d[:, :1], weight.m, 20)
    ext = load_qmatmul()
    if ext is not None:
        with pytest.raises(RuntimeError):
            ext.q4_matmul(torch.randn(2, 63), weight.levels, weight.d, weight.m, 20, "")
        with pytest.raises(RuntimeError):
            ext.q4_matmul(torch.randn(2, 96), weight.levels, weight.d, weight.m, 20, "")
        with pytest.raises(RuntimeError):
            ext.q4_matmul(torch.randn(2, 64), weight.levels, weight.d, weight.m, 20, "sse9")


def test_round_to_nearest_matches_llama_cpp_quantize() -> None:
    values = np.random.default_rng(1).standard_normal((48, 128)).astype(np.float32)
    ours = quantize_q4_1(torch.from_numpy(values)).dequantize().numpy()
    theirs = dequantize(quantize(values, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    # the same levels and fp16 scales; a float32 rounding tie may land a weight one level apart
    mismatched = np.abs(ours - theirs) > 1e-6
    assert mismatched.mean() < 1e-3


def test_a_q4_1_weight_staged_in_fp16_keeps_its_levels() -> None:
    values = np.random.default_rng(2).standard_normal((40, 96)).astype(np.float32)
    raw = quantize(values, GGMLQuantizationType.Q4_1)
    source = q4_from_gguf(raw, "Q4_1")
    staged = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_1)).half()  # what the loader holds
    again = quantize_q4_1(staged)
    assert torch.equal(again.blocks()[0], source.blocks()[0])
    assert torch.allclose(again.dequantize(), source.dequantize(), atol=2e-3)


def test_weight_bytes_counts_each_format_once(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "llama", "LlamaForCausalLM")
    exact = load_model(path)
    assert weight_bytes(exact) == {"float32": 4 * sum(p.numel() for p in exact.parameters())}  # type: ignore[attr-defined]
    compact = load_model(path, quantization="q4_1")
    held = weight_bytes(compact)
    weights = sum(m.q4.n * m.q4.shape[1] for m in compact.modules() if isinstance(m, Q4Linear))  # type: ignore[attr-defined]
    # half a byte a weight, plus fp16 scales and minimums (a quarter byte more) and the last group's padding
    assert weights * 0.625 <= held["q4_1"] <= weights * 0.7
    assert held["bfloat16"] == 2 * compact.model.embed_tokens.weight.numel()  # type: ignore[attr-defined]
