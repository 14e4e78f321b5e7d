"""Gemma 2, Gemma 3 and Phi-3 from GGUF files written here as llama.cpp's converter writes them (names,
metadata, Gemma's (1 + w) norms, Phi-3's fused tensors and LongRoPE factor tensors): the config comes from
the file's metadata, the weights from its tensors, and the model matches transformers on the same weights."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file

from agreement import Agreement, margin_of, margins_of_logits
from tiny_models import make_tiny_model
from tricklm.config import EngineConfig
from tricklm.engine.core import EngineCore
from tricklm.engine.request import Request
from tricklm.engine.sampling_params import SamplingParams
from tricklm.model.base import CausalLM
from tricklm.model.config import ModelLoadError
from tricklm.model.layers import RopeSpec, RotaryEmbedding
from tricklm.model.weights.gguf_config import gguf_hf_config
from tricklm.model.weights.gguf_file import GGUF_LINK, open_reader
from tricklm.model.weights.loader import load_model
from tricklm.model.weights.qlinear import QLinear

transformers = pytest.importorskip("transformers")

# HF module -> llama.cpp name, per family (what convert_hf_to_gguf.py writes)
_COMMON = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GEMMA = {
    **_COMMON,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_PHI3 = {
    **_COMMON,
    "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_up_proj": "ffn_up",
    "post_attention_layernorm": "ffn_norm",
}
FAMILIES = {
    "llama": ("LlamaForCausalLM", {**_COMMON, "post_attention_layernorm": "ffn_norm"}),
    "gemma2": ("Gemma2ForCausalLM", _GEMMA),
    "gemma3": ("Gemma3ForCausalLM", _GEMMA),
    "phi3": ("Phi3ForCausalLM", _PHI3),
}
PROMPT = list(range(3, 27))
# Llama 3.2's rope_scaling, with an original context (64) that puts each of a 16-wide head's frequencies in
# one of the three bands (unscaled, smoothed, divided by the factor)
LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}  # fmt: skip
NUM_NEW_TOKENS = 8


def gguf_name(hf: str, names: dict[str, str]) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf in top or hf == "lm_head.weight":
        return top.get(hf, "output.weight")
    parts = hf.split(".")  # model.layers.N.<module>.<param>
    return f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_metadata(writer: GGUFWriter, arch: str, config: Any) -> None:
    """The hyper-parameters convert_hf_to_gguf.py writes for the family (`vocab_size` for llama only: a real
    Gemma 3 file from llama.cpp has none, and the loader once refused it for that)."""
    c = config
    for key, value in {
        "block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
    }.items():  # fmt: skip
        writer.add_uint32(f"{arch}.{key}", value)
    if arch == "llama":
        writer.add_uint32(f"{arch}.vocab_size", c.vocab_size)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    if arch.startswith("gemma"):
        writer.add_uint32(f"{arch}.attention.key_length", c.head_dim)
        writer.add_uint32(f"{arch}.attention.value_length", c.head_dim)
        writer.add_uint32(f"{arch}.attention.sliding_window", c.sliding_window)
        rope = c.rope_parameters["full_attention"] if arch == "gemma3" else c.rope_parameters
        writer.add_float32(f"{arch}.rope.freq_base", rope["rope_theta"])
    if arch == "gemma2":
        writer.add_float32(f"{arch}.attn_logit_softcapping", c.attn_logit_softcapping)
        writer.add_float32(f"{arch}.final_logit_softcapping", c.final_logit_softcapping)
    if arch == "gemma3":  # the tiny model's own pattern, its local base, its linear scaling
        writer.add_uint32(f"{arch}.attention.sliding_window_pattern", 2)
        writer.add_float32(f"{arch}.rope.freq_base_swa", c.rope_parameters["sliding_attention"]["rope_theta"])
        writer.add_string(f"{arch}.rope.scaling.type", "linear")
        writer.add_float32(f"{arch}.rope.scaling.factor", c.rope_parameters["full_attention"]["factor"])
        writer.add_float32(f"{arch}.final_logit_softcapping", c.final_logit_softcapping)
    if arch == "llama":  # Llama 3.1+: the scaling as llama.cpp's converter computes it, a tensor of divisors
        writer.add_float32(f"{arch}.rope.freq_base", c.rope_parameters["rope_theta"])
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(c.rope_parameters, c.head_dim))
    if arch == "phi3":
        rope = c.rope_parameters
        writer.add_float32(f"{arch}.rope.freq_base", rope["rope_theta"])
        writer.add_uint32(
            f"{arch}.rope.dimension_count", int(c.hidden_size // c.num_attention_heads * rope["partial_rotary_factor"])
        )
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length", rope["original_max_position_embeddings"])
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))


def llama3_rope_freqs(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """`rope_freqs.weight` as llama.cpp's converter (conversion/llama.py) writes it for a llama3 scaling."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / rope["rope_theta"] ** (i / head_dim))
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def llama_cpp_permuted(w: np.ndarray, heads: int) -> np.ndarray:
    """Q or K rows in the order llama.cpp's converter writes a `llama` file (interleaved halves)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, out: Path, arch: str, qtype: str) -> dict[str, torch.Tensor]:
    """The folder's model as a GGUF file: matrices in `qtype` (the token table F16), vectors F32, Gemma's
    norms as (1 + w). Returns the Hugging Face state dict the file holds (matrices as they dequantize)."""
    names = FAMILIES[arch][1]
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    writer = GGUFWriter(str(out), arch)
    write_metadata(writer, arch, config)
    kind = GGMLQuantizationType[qtype]
    held = {}
    for name, tensor in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        w = tensor.float().numpy()
        if w.ndim == 2:
            table = "embed_tokens" in name
            stored = w.astype(np.float16) if table or qtype == "F16" else quantize(w, kind)
            back = stored.astype(np.float32) if table or qtype == "F16" else dequantize(stored, kind)
            if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):  # rows are blocks apart
                heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
                stored = llama_cpp_permuted(stored, heads)
            writer.add_tensor(gguf_name(name, names), stored, raw_dtype=None if table or qtype == "F16" else kind)
        else:
            is_plus_one = arch.startswith("gemma") and name.endswith("norm.weight")
            writer.add_tensor(gguf_name(name, names), w + 1.0 if is_plus_one else w)
            back = w
        held[name] = torch.from_numpy(np.asarray(back, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def gguf_folder(hf_dir: Path, tmp: Path, arch: str, qtype: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """What `convert_gguf` writes, but the tokenizer copied from the HF folder (the file has none)."""
    file = tmp / f"{arch}-{qtype}.gguf"
    held = write_gguf(hf_dir, file, arch, qtype)
    reader = open_reader(file)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    folder = tmp / f"{arch}-{qtype}"
    shutil.copytree(hf_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = gguf_hf_config(reader, meta, file)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / GGUF_LINK).symlink_to(file)
    return folder, held


def hf_with(hf_dir: Path, weights: dict[str, torch.Tensor]) -> Any:
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    hf.load_state_dict(weights, strict=False)
    if hf.config.tie_word_embeddings:
        hf.tie_weights()
    hf.generation_config.eos_token_id = None
    return hf.eval()


def greedy(model: CausalLM, quantization: str) -> tuple[list[int], list[float], torch.Tensor]:
    """Greedy tokens, each step's top-2 margin, and the prompt's logits."""

    def request() -> Request:
        params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2)
        return Request("r", PROMPT, params, NUM_NEW_TOKENS)

    core = EngineCore(model, EngineConfig(quantization=quantization, native_decode=False))
    core.add_request(request())
    first = core.runner.forward_logits(core.scheduler.schedule())
    core = EngineCore(model, EngineConfig(quantization=quantization, native_decode=False))
    core.add_request(request())
    tokens: list[int] = []
    margins: list[float] = []
    while core.has_work:
        outputs = core.step()
        tokens += [t for out in outputs for t in out.new_token_ids]
        margins += [margin_of(lp.top) for out in outputs for lp in out.logprobs or []]
    return tokens, margins, first


@torch.inference_mode()
def hf_greedy(hf: Any) -> tuple[list[int], list[float], torch.Tensor]:
    ids = torch.tensor([PROMPT])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=NUM_NEW_TOKENS,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    margins = margins_of_logits([step[0] for step in out.logits])
    return out.sequences[0, len(PROMPT) :].tolist(), margins, hf(ids).logits[0]


@pytest.mark.parametrize("arch", list(FAMILIES))
@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_gguf_file_gives_the_hugging_face_model(tmp_path: Path, arch: str, qtype: str) -> None:
    # llama.cpp scales Gemma's queries by head_dim, as every released Gemma but the 27B ones does
    overrides: dict[str, Any] = {"query_pre_attn_scalar": 16} if arch.startswith("gemma") else {}
    if arch == "llama":  # a Llama 3.2-style scaling whose three bands all hold frequencies of a 16-wide head
        overrides["rope_scaling"] = LLAMA3_SCALING
    hf_dir = make_tiny_model(tmp_path / "hf", FAMILIES[arch][0], **overrides)
    folder, held = gguf_folder(hf_dir, tmp_path, arch, qtype)
    ours = load_model(folder, torch.float32, "none")
    reference = load_model(hf_dir).config
    # metadata -> config: every field the model reads (the file keeps eps in float32)
    # (a llama file holds its llama3 scaling as llama.cpp's divisors: the same frequencies, checked below)
    same = {"norm_eps": ours.config.norm_eps, "rope_scaling": ours.config.rope_scaling}
    assert ours.config == dataclasses.replace(reference, **same)
    if arch == "llama":
        ours_rope, hf_rope = (RotaryEmbedding(RopeSpec.of(c)) for c in (ours.config, reference))
        assert torch.allclose(ours_rope.cos, hf_rope.cos, atol=1e-6)
        assert torch.allclose(ours_rope.sin, hf_rope.sin, atol=1e-6)
        assert reference.rope_scaling is not None and reference.rope_scaling["rope_type"] == "llama3"
    assert ours.config.norm_eps == pytest.approx(reference.norm_eps)
    hf = hf_with(hf_dir, held)
    tokens, margins, logits = greedy(ours, "none")
    hf_tokens, hf_margins, hf_logits = hf_greedy(hf)
    assert (logits - hf_logits).abs().max().item() <= 1e-4
    # so the tokens agree wherever the two most likely are further apart than 2e-4
    agreement = Agreement(2e-4)
    agreement.check(tokens, hf_tokens, margins, hf_margins)
    agreement.assert_meaningful()
    if qtype == "Q8_0":  # the file's own blocks, on the block path: the same next tokens, nearly always
        blocks = load_model(folder, torch.float32, "gguf")
        assert isinstance(blocks.model.layers[0].self_attn.o_proj, QLinear)  # type: ignore[attr-defined]
        agree = greedy(blocks, "gguf")[2].argmax(-1) == logits.argmax(-1)
        assert agree.float().mean() >= 0.8


def test_a_missing_hyper_parameter_is_named(tmp_path: Path) -> None:
    hf_dir = make_tiny_model(tmp_path / "hf", "Gemma3ForCausalLM")
    file = tmp_path / "gemma3.gguf"
    write_gguf(hf_dir, file, "gemma3", "F16")
    reader = open_reader(file)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert "gemma3.vocab_size" not in meta  # as llama.cpp writes a Gemma 3 file: taken from the token table
    vocab_size = transformers.AutoConfig.from_pretrained(hf_dir).vocab_size
    assert gguf_hf_config(reader, meta, file)["vocab_size"] == vocab_size
    del meta["gemma3.feed_forward_length"]
    with pytest.raises(ModelLoadError, match=r"GGUF metadata lacks gemma3\.feed_forward_length$"):
        gguf_hf_config(reader, meta, file)
