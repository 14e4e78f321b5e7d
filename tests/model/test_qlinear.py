"""The one-copy block projection: layout round trips, every GGUF type, llama.cpp's roundings, and every
kernel against a reference, in 4 and 8 bits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from agreement import margins_of_logits
from tiny_models import make_tiny_model, random_k_quant
from tricklm.model.weights import blocks as blocks_module
from tricklm.model.weights.blocks import gguf_blocks, round_blocks
from tricklm.model.weights.loader import load_model
from tricklm.model.weights.qlinear import (
    REFINED,
    QEmbedding,
    QLinear,
    QWeight,
    int8_rounded,
    load_qmatmul,
    qmatmul,
    quantize_blocks,
    qweight_from_gguf,
)
from tricklm.model.weights.quant import weight_bytes

SHAPES = [(1, 32), (17, 96), (33, 64), (100, 576), (16, 2048)]  # n not a multiple of 16, k not of 256
ROWS = [1, 3, 4, 5, 16, 17, 64, 130]  # 130: past one AMX call of 64 rows


def _random_weight(n: int, k: int, seed: int = 0, bits: int = 4) -> tuple[QWeight, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 1 << bits, (n, k), generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3) / (1 << (bits - 4))
    m = -(1 << (bits - 1)) * d + torch.randn(n, k // 32, generator=gen) * 0.01
    return QWeight.from_blocks(levels, d, m), levels


def _kernels() -> list[str]:
    ext = load_qmatmul()
    if ext is None:
        return ["torch"]
    best = ext.isa()
    runnable = {"torch", "scalar", best} | ({"avx2"} if best == "avx512vnni" else set())
    return sorted(runnable | ({"amx"} if ext.amx() else set()))


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_repacking_round_trips(n: int, k: int, bits: int) -> None:
    weight, levels = _random_weight(n, k, bits=bits)
    back, d, m = weight.blocks()
    assert torch.equal(back, levels)
    assert weight.bits == bits and weight.shape == (n, k) and d.shape == m.shape == (n, k // 32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("isa", _kernels())
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_kernels_agree_with_a_reference(isa: str, n: int, k: int, bits: int) -> None:
    weight, _ = _random_weight(n, k, seed=n + k, bits=bits)
    dense = weight.dequantize()
    for rows in ROWS:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        got = qmatmul(x, weight, isa)
        # the fallback multiplies float32 activations; the kernels int8 ones (AMX: bfloat16 activations and
        # weights), and only their sums differ
        if isa == "amx":
            want = _bf16(x) @ _bf16(dense).t()
        else:
            want = x @ dense.t() if isa == "torch" else int8_rounded(x) @ dense.t()
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-5 * scale, (isa, rows)
        # against float activations: int8 rounding, well under a percent
        assert (got - x @ dense.t()).abs().max().item() <= 0.02 * scale


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("isa", _kernels())
def test_kernels_do_not_saturate_on_extreme_blocks(isa: str, bits: int) -> None:
    # the largest levels times the largest activations, of one sign: the integer sums the kernels keep
    # in 16 bits before widening are at their bounds here
    n, k, top = 16, 256, (1 << bits) - 1
    levels = torch.full((n, k), top)
    levels[1::2] = 0  # the smallest levels too (8-bit levels are recentred, so 0 is the largest magnitude)
    d = torch.full((n, k // 32), 0.01)
    weight = QWeight.from_blocks(levels, d, torch.zeros(n, k // 32))
    for sign in (1.0, -1.0):
        x = torch.full((3, k), sign)
        want = x @ weight.dequantize().t()
        got = qmatmul(x, weight, isa)
        tolerance = 1e-2 if isa == "amx" else 1e-5  # AMX: bfloat16 activations and weights
        assert (got - want).abs().max().item() <= tolerance * want.abs().max().item(), (isa, sign)


@pytest.mark.parametrize(("qtype", "bits"), [("Q4_0", 4), ("Q4_1", 4), ("Q5_0", 8), ("Q5_1", 8), ("Q8_0", 8)])
def test_gguf_blocks_load_as_the_gguf_package_dequantizes_them(qtype: str, bits: int) -> None:
    values = np.random.default_rng(0).standard_normal((37, 96)).astype(np.float32)
    kind = GGMLQuantizationType[qtype]
    raw = quantize(values, kind)
    weight = qweight_from_gguf(raw, qtype)
    assert weight.shape == (37, 96) and weight.bits == bits
    np.testing.assert_array_equal(weight.dequantize().numpy(), dequantize(raw, kind).astype(np.float32))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K"])
def test_k_quants_keep_their_levels(qtype: str) -> None:
    raw = random_k_quant(20, 512, qtype)
    weight = qweight_from_gguf(raw, qtype)
    assert weight.bits == (4 if qtype == "Q4_K" else 8)
    want = torch.from_numpy(dequantize(raw, GGMLQuantizationType[qtype]).astype(np.float32))
    # the levels are the file's; only the products d x scale and dmin x min are rounded to fp16, by at
    # most 2^-11 of each of the two terms of d level + m
    _, d, m = weight.blocks()
    tolerance = 2.0**-10 * (d.abs() * 31 + m.abs()).unsqueeze(-1)
    assert ((weight.dequantize() - want).view(20, -1, 32).abs() <= tolerance).all()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K"])
def test_k_quant_levels_read_from_the_bytes_are_those_dequantizing_finds(
    qtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = random_k_quant(40, 512, qtype)
    direct = blocks_module._exact_rows(raw, qtype)
    monkeypatch.delitem(blocks_module.K_LEVELS, qtype)  # the path every other type takes
    divided = blocks_module._exact_rows(raw, qtype)
    assert all(torch.equal(a, b) for a, b in zip(direct, divided, strict=True))


def test_other_gguf_types_are_not_read_as_blocks() -> None:
    with pytest.raises(ValueError, match="Q6_K"):
        gguf_blocks(random_k_quant(4, 256, "Q6_K"), "Q6_K")


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q5_0", "q8_0"])
def test_round_to_nearest_matches_llama_cpp_quantize(fmt: str) -> None:
    values = np.random.default_rng(1).standard_normal((48, 128)).astype(np.float32)
    ours = quantize_blocks(torch.from_numpy(values), fmt).dequantize().numpy()
    kind = GGMLQuantizationType[fmt.upper()]
    theirs = dequantize(quantize(values, kind), kind)
    # the same levels and fp16 scales; a float32 rounding tie may land a weight one level apart
    mismatched = np.abs(ours - theirs) > 1e-6
    assert mismatched.mean() < 1e-3


def test_q4_k_rounding_is_llama_cpp_s_structure_and_no_worse_than_q4_1() -> None:
    values = torch.from_numpy(np.random.default_rng(3).standard_normal((64, 512)).astype(np.float32))
    levels, d, m = round_blocks(values, "q4_k")
    assert int(levels.max()) <= 15
    # each block's scale is a 6-bit multiple of its super-block's fp16 factor, and so is its -min (the
    # products then kept in fp16, to 2^-11)
    for factor in (d, -m):
        per_super = factor.view(64, 2, 8)
        multiples = per_super / (per_super.amax(-1, keepdim=True) / 63)
        assert ((multiples - multiples.round()).abs() <= multiples * 2.0**-10).all()
    k_error = (quantize_blocks(values, "q4_k").dequantize() - values).square().mean()
    q4_1_error = (quantize_blocks(values, "q4_1").dequantize() - values).square().mean()
    assert k_error <= 1.05 * q4_1_error


def test_q4_k_falls_back_to_8_bits_where_inputs_are_not_super_blocks() -> None:
    values = torch.randn(8, 96)
    assert quantize_blocks(values, "q4_k").bits == 8


def test_linear_keeps_leading_dimensions_and_adds_its_bias() -> None:
    weight, _ = _random_weight(40, 64)
    bias = torch.randn(40)
    layer = QLinear(weight, bias)
    x = torch.randn(2, 3, 64)
    want = qmatmul(x.view(6, 64), weight).view(2, 3, 40) + bias
    assert torch.allclose(layer(x), want)


def test_bad_shapes_are_refused() -> None:
    weight, _ = _random_weight(20, 64)
    with pytest.raises(ValueError):
        QWeight(weight.levels, weight.d, weight.m, 40)  # more columns than the groups hold
    with pytest.raises(ValueError):
        QWeight(weight.levels, weight.d[:, :1], weight.m, 20)
    ext = load_qmatmul()
    if ext is not None:
        with pytest.raises(RuntimeError):
            ext.qmatmul(torch.randn(2, 63), weight.levels, weight.d, weight.m, 20, "")
        with pytest.raises(RuntimeError):
            ext.qmatmul(torch.randn(2, 96), weight.levels, weight.d, weight.m, 20, "")
        with pytest.raises(RuntimeError):
            ext.qmatmul(torch.randn(2, 64), weight.levels, weight.d, weight.m, 20, "sse9")


def test_a_q4_1_weight_staged_in_fp16_keeps_its_levels() -> None:
    values = np.random.default_rng(2).standard_normal((40, 96)).astype(np.float32)
    raw = quantize(values, GGMLQuantizationType.Q4_1)
    source = qweight_from_gguf(raw, "Q4_1")
    staged = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_1)).half()  # what the loader holds
    again = quantize_blocks(staged, "q4_1")
    assert torch.equal(again.blocks()[0], source.blocks()[0])
    assert torch.allclose(again.dequantize(), source.dequantize(), atol=2e-3)


def test_weight_bytes_counts_each_format_once(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "llama", "LlamaForCausalLM")
    exact = load_model(path)
    assert weight_bytes(exact) == {"float32": 4 * sum(p.numel() for p in exact.parameters())}  # type: ignore[attr-defined]
    compact = load_model(path, quantization="q4_1")
    held = weight_bytes(compact)
    blocks = {id(m.qweight): m.qweight for m in compact.modules() if isinstance(m, QLinear | QEmbedding)}  # type: ignore[attr-defined]
    four = sum(w.n * w.shape[1] for w in blocks.values() if w.bits == 4)
    eight = sum(w.n * w.shape[1] for w in blocks.values() if w.bits == 8)
    # half a byte a weight (or one: the table and head), plus fp16 scales and minimums (a quarter byte
    # more) and the last group's padding
    assert four * 0.625 <= held["4-bit blocks"] <= four * 0.7
    assert held["8-bit blocks"] == eight * 1.125
    assert set(held) == {"4-bit blocks", "8-bit blocks", "float32"}  # float32: the norms
    # a tied head is the 8-bit table itself, counted once
    tied = load_model(
        make_tiny_model(tmp_path / "tied", "LlamaForCausalLM", tie_word_embeddings=True), quantization="q4_1"
    )
    table = tied.model.embed_tokens.qweight  # type: ignore[attr-defined]
    assert tied.lm_head.qweight is table  # type: ignore[attr-defined]
    assert weight_bytes(tied)["8-bit blocks"] == table.nbytes


@pytest.mark.parametrize("bits", [4, 8])
def test_a_table_hands_out_its_rows(bits: int) -> None:
    weight, _ = _random_weight(37, 96, bits=bits)
    table = QEmbedding(weight)
    ids = torch.tensor([[0, 36, 5], [16, 17, 5]])
    assert torch.equal(table(ids), weight.dequantize()[ids])  # the native lookup where it builds
    assert torch.equal(weight.rows_in_torch(ids.reshape(-1)), weight.dequantize()[ids.reshape(-1)])


def test_the_native_lookup_refuses_rows_past_the_table() -> None:
    ext = load_qmatmul()
    if ext is None:
        pytest.skip("no native extension here")
    weight, _ = _random_weight(37, 96, bits=4)
    for bad in (37, -1):
        with pytest.raises(RuntimeError, match="out of range"):
            ext.weight_rows(torch.tensor([0, bad]), weight.levels, weight.d, weight.m, weight.n)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_precise_projection_recomputes_each_row_s_largest_outputs_from_float_activations(bits: int) -> None:
    weight, _ = _random_weight(100, 576, bits=bits)  # the last group ragged
    x = torch.randn(70, 576, generator=torch.Generator().manual_seed(5))  # past AMX's threshold too
    want = x @ weight.dequantize().t()
    scale = want.abs().max().item()
    plain, precise = QLinear(weight, None)(x), QLinear(weight, None, precise=True)(x)
    if load_qmatmul() is None:
        assert torch.allclose(precise, want, atol=1e-5 * scale)
        return
    top = plain.topk(REFINED, dim=-1).indices
    refined = torch.zeros_like(plain, dtype=torch.bool).scatter_(1, top, True)
    assert (precise - want)[refined].abs().max().item() <= 1e-5 * scale
    assert torch.equal(precise[~refined], plain[~refined])  # the others keep the kernel's values
    assert (plain - want).abs().max().item() > 1e-4 * scale  # (so the refinement did something)
    # the refined values are within 1e-5 of the float ones: the top choice agrees where it leads by more
    clear = torch.tensor(margins_of_logits(list(want))) > 2e-5 * scale
    assert clear.float().mean() > 0.9
    assert torch.equal(precise.argmax(dim=-1)[clear], want.argmax(dim=-1)[clear])


@pytest.mark.skipif(not (load_qmatmul() and load_qmatmul().amx()), reason="this CPU has no AMX")
@pytest.mark.parametrize("bits", [4, 8])
def test_chunks_of_many_rows_run_on_amx(bits: int) -> None:
    ext = load_qmatmul()
    weight, _ = _random_weight(100, 576, bits=bits)
    gen = torch.Generator().manual_seed(9)
    few, many = torch.randn(ext.AMX_MIN_ROWS - 1, 576, generator=gen), torch.randn(130, 576, generator=gen)
    assert torch.equal(qmatmul(few, weight), qmatmul(few, weight, "int8"))
    assert torch.equal(qmatmul(many, weight), qmatmul(many, weight, "amx"))  # 130: three GEMM calls of rows
    assert not torch.equal(qmatmul(many, weight), qmatmul(many, weight, "int8"))


@pytest.mark.skipif(load_qmatmul() is None or load_qmatmul().amx(), reason="this CPU has AMX, or no extension")
def test_amx_is_refused_where_the_cpu_lacks_it() -> None:
    weight, _ = _random_weight(17, 96)
    with pytest.raises(RuntimeError, match="cannot run the amx kernel"):
        qmatmul(torch.randn(40, 96), weight, "amx")


@pytest.mark.parametrize("bits", [4, 8])
def test_a_weight_larger_than_one_packing_slice_round_trips(bits: int) -> None:
    weight, levels = _random_weight(4096 + 37, 64, bits=bits)  # two slices, the second one ragged
    back, _, _ = weight.blocks()
    assert torch.equal(back, levels)


def test_large_block_weights_start_on_a_huge_page_and_round_trip() -> None:
    import mmap

    from tricklm.model.weights.qlinear import HUGE_PAGE, QWeight, huge_page_buffer

    small = huge_page_buffer(4096)
    assert small.numel() == 4096  # under a huge page: plain memory
    rng = np.random.default_rng(0)
    levels = torch.from_numpy(rng.integers(0, 16, size=(4096, 2048), dtype=np.uint8))  # 4 MiB of 4-bit blocks
    d = torch.from_numpy(rng.random((4096, 64), dtype=np.float32)).half()
    m = torch.from_numpy(rng.random((4096, 64), dtype=np.float32)).half()
    weight = QWeight.from_blocks(levels, d, m)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert weight.levels.data_ptr() % HUGE_PAGE == 0  # advised before anything was written to it
    back = weight.blocks()
    assert torch.equal(back[0], levels) and torch.equal(back[1], d) and torch.equal(back[2], m)
