"""Turn a llama-architecture `.gguf` file into a Hugging Face folder we can load in about a second.

Weights are dequantised to fp32 safetensors; the tokenizer and chat template are rebuilt by
`transformers` (its GGUF reader) and saved as tokenizer.json / tokenizer_config.json.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from tricklm.model.config import ModelLoadError

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Write `out_dir` atomically: a crash mid-way leaves no half-written model behind."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on a damaged file
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF file: {e}") from None
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    config = _hf_config(meta, has_output=any(t.name == "output.weight" for t in reader.tensors))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        tensors = _dequantize_all(reader, config, progress, gguf_path.name)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", _generation_config(meta))
        _save_tokenizer(gguf_path, tmp, meta)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _metadata(reader: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "scores", "token_type", "merges")):
            continue  # large arrays; the tokenizer is rebuilt by transformers
        try:
            out[key] = field.contents()
        except Exception:  # fields of exotic types are irrelevant to us
            continue
    return out


def _hf_config(meta: dict[str, Any], has_output: bool) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"llama.{key}", default)

    try:
        heads = int(get("attention.head_count"))
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": int(get("vocab_size")),
            "hidden_size": int(get("embedding_length")),
            "intermediate_size": int(get("feed_forward_length")),
            "num_hidden_layers": int(get("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(get("attention.head_count_kv", heads)),
            "max_position_embeddings": int(get("context_length", 2048)),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "hidden_act": "silu",
            "tie_word_embeddings": not has_output,
            "torch_dtype": "float32",
        }
    except TypeError:
        raise ModelLoadError("GGUF metadata lacks the llama.* hyper-parameters") from None
    if get("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    for key in ("bos_token_id", "eos_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = int(value)
    return config


def _generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        k: int(meta[f"tokenizer.ggml.{k}"]) for k in ("bos_token_id", "eos_token_id") if f"tokenizer.ggml.{k}" in meta
    }


def _dequantize_all(reader: Any, config: dict[str, Any], progress: bool, label: str) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"converting {label}", unit="tensor", disable=not progress):
        name = _hf_name(t.name)
        array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        array = array.reshape(tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("q_proj.weight"):
            array = _unpermute(array, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            array = _unpermute(array, config["num_key_value_heads"])
        out[name] = torch.from_numpy(np.array(array, copy=True))
    return out


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    raise ModelLoadError(f"unexpected tensor {gguf_name!r} in GGUF file")


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row order for Q/K (back to the Hugging Face half-rotation)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _save_tokenizer(gguf_path: Path, out_dir: Path, meta: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out_dir))
    # Keep the template inside tokenizer_config.json too, where older readers look for it.
    template = meta.get("tokenizer.chat_template")
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if template and "chat_template" not in cfg:
        cfg["chat_template"] = template
        _write_json(cfg_path, cfg)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
