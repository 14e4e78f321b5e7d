"""Weights read straight from a GGUF file: every tensor type, llama.cpp's Q/K order, the one-copy path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file

from tiny_models import K_FACTORS, make_tiny_model, random_k_quant
from tricklm.config import EngineConfig
from tricklm.engine.core import EngineCore
from tricklm.engine.llm import LLM
from tricklm.engine.request import Request
from tricklm.engine.sampling_params import SamplingParams
from tricklm.model.config import ModelLoadError
from tricklm.model.resolve import default_gguf_path
from tricklm.model.weights.gguf_file import GGUF_LINK, weights_reader
from tricklm.model.weights.loader import load_model
from tricklm.model.weights.qlinear import QEmbedding, QLinear
from tricklm.model.weights.quant import HalfLinear

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
HEADS, KV_HEADS = 4, 2  # tiny_models' Llama


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf in top:
        return top[hf]
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")  # model.layers.N.<module>.<param>
    return f"blk.{parts[2]}.{_GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert: Hugging Face's rotary halves -> interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, out: Path, qtype: str, arch: str = "llama") -> dict[str, np.ndarray]:
    """The HF folder's weights as a llama.cpp-style GGUF: 2-D projections in `qtype`, the rest F32; Q and K
    permuted as llama.cpp's convert does for `llama` only.

    Returns what each tensor dequantizes to, in Hugging Face order (what a loader must produce)."""
    writer = GGUFWriter(str(out), arch)
    expected = {}
    kind = GGMLQuantizationType[qtype]
    for name, tensor in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        w = tensor.float().numpy()
        heads = HEADS if ".q_proj." in name else KV_HEADS if ".k_proj." in name else None
        heads = heads if arch == "llama" and name.endswith(".weight") else None
        stored = _permute(w, heads) if heads else w
        if w.ndim == 2 and "embed" not in name and "lm_head" not in name:
            if qtype in K_FACTORS:  # random blocks: the `gguf` package cannot write K-quants
                raw = random_k_quant(*stored.shape, qtype, seed=len(expected))
            else:
                raw = quantize(stored, kind) if qtype != "F32" else stored
            back = dequantize(raw, kind) if qtype != "F32" else stored
            writer.add_tensor(_gguf_name(name), raw, raw_dtype=kind)
        else:
            back = stored
            writer.add_tensor(_gguf_name(name), stored)
        order = np.arange(w.shape[0])
        if heads:
            order = _permute(order[:, None], heads)[:, 0].argsort()  # the inverse permutation
        expected[name] = np.asarray(back, dtype=np.float32)[order]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("hf") / "llama", "LlamaForCausalLM", weight_std=0.1)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose projections take multiples of 256 inputs, as K-quants need."""
    path = tmp_path_factory.mktemp("hf") / "wide"
    return make_tiny_model(path, "LlamaForCausalLM", weight_std=0.1, hidden_size=256, intermediate_size=256)


def _gguf_folder(hf_dir: Path, tmp: Path, qtype: str) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp / f"gguf-{qtype}"
    shutil.copytree(hf_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    expected = write_gguf(hf_dir, tmp / f"{qtype}.gguf", qtype)
    (folder / GGUF_LINK).symlink_to(tmp / f"{qtype}.gguf")
    return folder, expected


def _fused(expected: dict[str, np.ndarray], layer: int, parts: list[str]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([expected[f"model.layers.{layer}.{p}.weight"] for p in parts]))


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_every_type_loads_as_the_gguf_package_dequantizes_it(hf_dir: Path, tmp_path: Path, qtype: str) -> None:
    folder, expected = _gguf_folder(hf_dir, tmp_path, qtype)
    model = load_model(folder, torch.float32, "none")
    layer = model.model.layers[1]  # type: ignore[attr-defined]
    qkv = _fused(expected, 1, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    assert torch.equal(layer.self_attn.qkv_proj.weight, qkv)
    assert torch.equal(layer.mlp.down_proj.weight, torch.from_numpy(expected["model.layers.1.mlp.down_proj.weight"]))
    assert torch.equal(model.model.norm.weight, torch.from_numpy(expected["model.norm.weight"]))  # type: ignore[attr-defined]


def _reader_table(path: Path) -> list[tuple[object, ...]]:
    """The tensor table as the `gguf` package's reader finds it."""
    from gguf import GGUFReader

    found = GGUFReader(str(path)).tensors
    return [
        (t.name, t.tensor_type.name, tuple(map(int, t.shape)), t.data.dtype.str, t.data.shape, t.data_offset)
        for t in found
    ]


def _assert_reader_table(path: Path) -> None:
    """The tensor table read from the header is what the `gguf` package's reader finds, bytes included."""
    from gguf import GGUFReader

    ours, theirs = weights_reader(path).tensors, GGUFReader(str(path)).tensors
    expected = [
        (t.name, t.tensor_type.name, tuple(map(int, t.shape)), t.data.dtype.str, t.data.shape, t.data_offset)
        for t in theirs
    ]
    assert [(t.name, t.type_name, t.shape, t.data_dtype, t.data_shape, t.data_offset) for t in ours] == expected
    assert all(t.n_bytes == t.data.nbytes and np.array_equal(t.data, r.data) for t, r in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
def test_the_tensor_table_read_from_the_header_is_the_gguf_readers(wide_dir: Path, tmp_path: Path, qtype: str) -> None:
    """Loading reads only the header's tensor table (the `gguf` reader parses all metadata first, the
    vocabulary too: seconds a load)."""
    write_gguf(wide_dir, tmp_path / "m.gguf", qtype)
    _assert_reader_table(tmp_path / "m.gguf")


def test_the_default_model_s_tensor_table_is_the_gguf_readers() -> None:
    _assert_reader_table(default_gguf_path())


def test_a_damaged_gguf_file_is_named(tmp_path: Path) -> None:
    whole = default_gguf_path().read_bytes()
    for name, content in [("empty", b""), ("magic", b"GGUX" + whole[4:]), ("cut", whole[: len(whole) // 2])]:
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(ModelLoadError, match="is not a readable GGUF file"):
            weights_reader(path)
    for alignment in (0, 3):  # a division by zero, a misaligned table: both the file's fault, said so
        path = tmp_path / f"align-{alignment}.gguf"
        writer = GGUFWriter(str(path), "llama")
        writer.add_uint32("general.alignment", alignment)
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(ModelLoadError, match=r"general\.alignment must be a power of two"):
            weights_reader(path)


@pytest.mark.parametrize(("arch", "gguf_arch"), [("Qwen2ForCausalLM", "qwen2"), ("Qwen3ForCausalLM", "qwen3")])
def test_qwen_gguf_files_give_the_hugging_face_model(tmp_path: Path, arch: str, gguf_arch: str) -> None:
    """No Q/K permutation outside `llama`; Qwen2's biases and Qwen3's per-head norms come from the file."""
    hf = make_tiny_model(tmp_path / "hf", arch, weight_std=0.1)
    reference = load_model(hf)
    for qtype in ("F32", "Q8_0"):
        folder = tmp_path / qtype
        shutil.copytree(hf, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        write_gguf(hf, tmp_path / f"{qtype}.gguf", qtype, arch=gguf_arch)
        (folder / GGUF_LINK).symlink_to(tmp_path / f"{qtype}.gguf")
        if qtype == "F32":  # every tensor, in Hugging Face's order
            ours = load_model(folder)
            for (name, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters(), strict=True):  # type: ignore[attr-defined]
                assert torch.equal(a, b), name
        else:  # the file's own 8-bit blocks; random weights have near-ties, a wrong row order would not agree
            blocks = load_model(folder, torch.float32, "gguf")
            attn = blocks.model.layers[0].self_attn  # type: ignore[attr-defined]
            assert isinstance(attn.o_proj, QLinear)
            # Qwen2's q/k/v carry biases, which the block path does not take yet: fp16 there
            assert isinstance(attn.qkv_proj, QLinear) == (arch == "Qwen3ForCausalLM")
            agree = _logits(blocks, "gguf").argmax(-1) == _logits(reference, "none").argmax(-1)
            assert agree.float().mean() >= 0.8


def test_gguf_metadata_of_each_architecture_becomes_its_config() -> None:
    from tricklm.model import registry
    from tricklm.model.weights.gguf_config import _hf_config

    meta = {
        f"qwen3.{k}": v
        for k, v in {
            "attention.head_count": 16,
            "attention.head_count_kv": 8,
            "attention.key_length": 128,
            "vocab_size": 151936,
            "embedding_length": 1024,
            "feed_forward_length": 3072,
            "block_count": 28,
            "rope.freq_base": 1e6,
        }.items()
    }
    config = _hf_config(meta, registry.QWEN3, has_output=False)
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 128
    assert config["num_key_value_heads"] == 8 and config["tie_word_embeddings"] and config["rope_theta"] == 1e6
    with pytest.raises(ModelLoadError, match="qwen2"):
        _hf_config({}, registry.QWEN2, has_output=True)


def test_f32_gguf_gives_the_hugging_face_model(hf_dir: Path, tmp_path: Path) -> None:
    folder, _ = _gguf_folder(hf_dir, tmp_path, "F32")
    ours, reference = load_model(folder), load_model(hf_dir)
    for (name, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters(), strict=True):  # type: ignore[attr-defined]
        assert torch.equal(a, b), name


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "F16"])
def test_one_copy_mode_builds_4_bit_projections_from_the_file(hf_dir: Path, tmp_path: Path, qtype: str) -> None:
    folder, expected = _gguf_folder(hf_dir, tmp_path, qtype)
    model = load_model(folder, torch.float32, "q4_1")
    layer = model.model.layers[0]  # type: ignore[attr-defined]
    projections = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
    assert all(isinstance(p, QLinear) for p in projections)
    qkv = _fused(expected, 0, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    got = layer.self_attn.qkv_proj.qweight.dequantize()
    if qtype == "F16":  # rounded to Q4_1 at load: within half a level of every block
        assert (got - qkv).abs().max() <= (qkv.abs().max() * 2 / 15) / 2 + 1e-3
    else:  # the file's own blocks: exactly what gguf dequantizes (fp16 scales kept)
        assert torch.equal(got, qkv)
        # and the model as a whole: the float path over the same weights picks the same next tokens
        # (int8 activations aside)
        a, b = _logits(model, "q4_1"), _logits(load_model(folder, torch.float32, "none"), "none")
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


def _logits(model: torch.nn.Module, quantization: str) -> torch.Tensor:
    core = EngineCore(model, EngineConfig(quantization=quantization, native_decode=False))  # type: ignore[arg-type]
    core.add_request(Request("r", list(range(3, 40)), SamplingParams(max_tokens=1), 1))
    return core.runner.forward_logits(core.scheduler.schedule())


def test_loading_imports_no_compiler_stack(hf_dir: Path, tmp_path: Path) -> None:
    """Building the model on the meta device imported torch._dynamo and sympy (68 MiB resident for good)."""
    folder, _ = _gguf_folder(hf_dir, tmp_path, "Q4_1")
    code = (
        "import sys, torch; from pathlib import Path; from tricklm.model.weights.loader import load_model; "
        f"load_model(Path({str(folder)!r}), torch.float32, 'auto'); "
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_default_model_serves_from_one_copy_of_its_own_blocks() -> None:
    llm = LLM(max_num_seqs=2)  # auto: the GGUF's own types
    try:
        model = llm.engine.core.runner.model
        projections = [m for m in model.modules() if isinstance(m, QLinear)]  # type: ignore[attr-defined]
        assert len(projections) == 4 * model.config.num_layers + 1  # and the tied head
        assert all(p.qweight.bits == 4 for p in projections[:-1])  # Q4_1
        table = model.model.embed_tokens  # type: ignore[attr-defined]
        assert isinstance(table, QEmbedding) and table.qweight.bits == 8  # Q8_0, read as it is
        assert model.lm_head.qweight is table.qweight  # type: ignore[attr-defined]
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # type: ignore[attr-defined]
        chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        assert "Paris" in llm.generate(chat, max_tokens=10, temperature=0.0)["text"]
        assert "Paris" in llm.generate("The capital of France is", max_tokens=4, temperature=0.0)["text"]
    finally:
        llm.shutdown()


def _projections(model: torch.nn.Module, layer: int = 0) -> list[torch.nn.Module]:
    block = model.model.layers[layer]  # type: ignore[attr-defined]
    return [block.self_attn.qkv_proj, block.self_attn.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj]


# (type, bits its blocks are kept in, whether they are the file's exactly)
GGUF_MODE_CASES = [
    ("Q4_0", 4, True),
    ("Q4_1", 4, True),
    ("Q5_0", 8, True),
    ("Q5_1", 8, True),
    ("Q8_0", 8, True),
    ("Q4_K", 4, True),
    ("Q5_K", 8, True),
    ("Q6_K", 8, False),
]


@pytest.mark.parametrize(("qtype", "bits", "exact"), GGUF_MODE_CASES)
def test_gguf_mode_keeps_each_type_in_its_own_blocks(
    wide_dir: Path, tmp_path: Path, qtype: str, bits: int, exact: bool
) -> None:
    folder, expected = _gguf_folder(wide_dir, tmp_path, qtype)
    model = load_model(folder, torch.float32, "auto")  # a GGUF file: its own types
    projections = _projections(model)
    assert all(isinstance(p, QLinear) and p.qweight.bits == bits for p in projections)
    down = torch.from_numpy(expected["model.layers.0.mlp.down_proj.weight"])
    got = projections[3].qweight.dequantize()
    blocks = down.view(down.shape[0], -1, 32)
    if exact and not qtype.endswith("_K"):
        assert torch.equal(got, down)
    elif exact:  # K-quants: the file's levels, d x scale and dmin x min rounded to fp16
        _, d, m = projections[3].qweight.blocks()
        tolerance = 2.0**-10 * (d.abs() * 31 + m.abs()).unsqueeze(-1)
        assert ((got.view_as(blocks) - blocks).abs() <= tolerance).all()
    else:  # rounded to 8 bits (q8_0): within half a step of each block's, plus the fp16 rounding of d
        largest = blocks.abs().amax(-1, keepdim=True)
        assert ((got.view_as(blocks) - blocks).abs() <= largest / 254 + largest * 2.0**-10).all()


@pytest.mark.parametrize("qtype", ["F16", "BF16", "F32"])
def test_gguf_mode_keeps_float_projections_in_fp16(hf_dir: Path, tmp_path: Path, qtype: str) -> None:
    folder, _ = _gguf_folder(hf_dir, tmp_path, qtype)
    model = load_model(folder, torch.float32, "gguf")
    assert all(isinstance(p, HalfLinear) and p.weight_dense is None for p in _projections(model))
    a, b = _logits(model, "gguf"), _logits(load_model(folder, torch.float32, "none"), "none")
    assert (a - b).abs().max() <= 1e-2 * b.abs().max()


def test_gguf_mode_needs_a_gguf_file(hf_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="gguf"):
        load_model(hf_dir, torch.float32, "gguf")


@pytest.mark.parametrize(("fmt", "bits"), [("q8_0", 8), ("q4_0", 4), ("q4_1", 4), ("q4_k", 4)])
def test_a_safetensors_folder_is_rounded_at_load(wide_dir: Path, fmt: str, bits: int) -> None:
    model = load_model(wide_dir, torch.float32, fmt)
    assert all(isinstance(p, QLinear) and p.qweight.bits == bits for p in _projections(model))
    a, b = _logits(model, fmt), _logits(load_model(wide_dir), "none")
    kld = F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="batchmean").item()
    # a random model is touchier than a trained one (q4_k 0.14, q4_1 0.21 nats here): 8 bits is close
    assert kld <= (0.01 if bits == 8 else 0.4), kld


def test_a_qwen3_gguf_file_serves_end_to_end(tmp_path: Path) -> None:
    """A whole `qwen3` file as a user would pass it: metadata -> config, the tokenizer rebuilt from the file
    (the shipped model's vocabulary), the weights, a generation."""
    from gguf import GGUFReader, GGUFValueType

    from tricklm.model.resolve import default_gguf_path
    from tricklm.model.weights.gguf_config import convert_gguf
    from tricklm.tokenizer import Tokenizer

    source = GGUFReader(str(default_gguf_path()))
    vocab, hidden, heads, kv_heads, head_dim, inter = (
        int(source.fields["llama.vocab_size"].contents()),
        64,
        4,
        2,
        32,
        96,
    )
    writer = GGUFWriter(str(tmp_path / "tiny-qwen3.gguf"), "qwen3")
    for key, value in {
        "block_count": 2, "context_length": 512, "embedding_length": hidden, "feed_forward_length": inter,
        "attention.head_count": heads, "attention.head_count_kv": kv_heads, "attention.key_length": head_dim,
        "attention.value_length": head_dim, "vocab_size": vocab,
    }.items():  # fmt: skip
        writer.add_uint32(f"qwen3.{key}", value)
    writer.add_float32("qwen3.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32("qwen3.rope.freq_base", 1e6)
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    rng = np.random.default_rng(0)
    dense = {
        "token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
        **{f"blk.{i}.{n}.weight": s for i in range(2) for n, s in {
            "attn_norm": (hidden,), "ffn_norm": (hidden,), "attn_q_norm": (head_dim,), "attn_k_norm": (head_dim,),
            "attn_q": (heads * head_dim, hidden), "attn_k": (kv_heads * head_dim, hidden),
            "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, heads * head_dim),
            "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden), "ffn_down": (hidden, inter),
        }.items()},
    }  # fmt: skip
    for name, shape in dense.items():
        w = rng.normal(0, 0.1, size=shape).astype(np.float32) + (1.0 if len(shape) == 1 else 0.0)
        if len(shape) == 2 and "token_embd" not in name:
            writer.add_tensor(name, quantize(w, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    folder = tmp_path / "converted"
    convert_gguf(tmp_path / "tiny-qwen3.gguf", folder, progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == head_dim
    tokenizer = Tokenizer(folder)
    ids = tokenizer.encode("The capital of France is")
    assert tokenizer.decode(ids) == "The capital of France is"
    core = EngineCore(load_model(folder, torch.float32, "gguf"), EngineConfig())
    core.add_request(Request("r", ids, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), 5))
    while core.has_work:
        core.step()
    assert isinstance(core.runner.model.model.layers[0].self_attn.qkv_proj, QLinear)  # type: ignore[union-attr]
