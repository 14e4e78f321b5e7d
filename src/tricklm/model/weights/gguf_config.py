"""Describe a `.gguf` file (architectures `llama`, `qwen2`, `qwen3`, `gemma2`, `gemma3`, `phi3`) as a small
Hugging Face folder: config, tokenizer, a link.

The folder holds config.json and generation_config.json (from the file's metadata), tokenizer.json and
tokenizer_config.json with the chat template (rebuilt once by `transformers`' GGUF reader), and
`model.gguf`, a link to the file itself: the weights are read from it at every start, tensor by tensor
(`gguf_file.py`), never converted. A few MB, however large the model. A BERT file (an embedding model) is
the exception: its folder is a sentence-transformers one with the weights in it (`gguf_bert.py`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tricklm.model.config import ModelLoadError
from tricklm.model.family import Family
from tricklm.model.registry import gguf_family
from tricklm.model.weights.files import write_json
from tricklm.model.weights.gguf_bert import write_bert_folder
from tricklm.model.weights.gguf_file import GGUF_LINK, ROPE_FACTOR_TENSORS, open_reader


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Write `out_dir` atomically: a crash mid-way leaves no half-written folder behind."""
    reader = open_reader(gguf_path)
    meta = _metadata(reader)
    bert = meta.get("general.architecture") == "bert"
    config = None if bert else gguf_hf_config(reader, meta, gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        if config is None:
            write_bert_folder(reader, meta, tmp)
        else:
            write_json(tmp / "config.json", config)
            write_json(tmp / "generation_config.json", _generation_config(meta))
            _save_tokenizer(gguf_path, tmp, meta)
        (tmp / GGUF_LINK).symlink_to(gguf_path.resolve())
        if out_dir.exists() and not (out_dir / GGUF_LINK).is_symlink():
            shutil.rmtree(out_dir)  # an older layout (float32 weights)
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / GGUF_LINK).is_symlink():
                raise  # not merely another process that finished the same folder first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_hf_config(reader: Any, meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """The Hugging Face config.json of a GGUF file, from its metadata `meta` and its tensors."""
    spec = gguf_family(meta.get("general.architecture"), path)
    arch = spec.gguf_architecture
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    # llama.cpp's converter writes <arch>.vocab_size for llama files only; the others have it in their tables
    meta = {f"{arch}.vocab_size": _vocab_size(reader), **meta}
    return _hf_config(meta, spec, has_output, rope_factors(reader))


def _vocab_size(reader: Any) -> int | None:
    """Rows of the token table (GGUF lists a tensor's dimensions innermost first), else the vocabulary's length."""
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            return int(t.shape[-1])
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return len(tokens.data) if tokens is not None else None


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


def rope_factors(reader: Any) -> dict[str, list[float]]:
    """LongRoPE's per-frequency factors, which llama.cpp stores as tensors (`rope_factors_short/long`)."""
    out = {}
    for t in reader.tensors:
        if t.name in ROPE_FACTOR_TENSORS:
            out[ROPE_FACTOR_TENSORS[t.name]] = [float(x) for x in np.asarray(t.data, dtype=np.float32).reshape(-1)]
    return out


def _hf_config(
    meta: dict[str, Any], spec: Family, has_output: bool, factors: dict[str, list[float]] | None = None
) -> dict[str, Any]:
    arch = spec.gguf_architecture

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    required = ("vocab_size", "embedding_length", "feed_forward_length", "block_count", "attention.head_count")
    missing = [f"{arch}.{key}" for key in required if get(key) is None]
    if missing:
        raise ModelLoadError(f"GGUF metadata lacks {', '.join(missing)}")
    try:
        heads = int(get("attention.head_count"))
        config: dict[str, Any] = {
            "architectures": [spec.architecture],
            "model_type": arch,
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
        raise ModelLoadError(f"GGUF metadata has {arch}.* hyper-parameters of the wrong type") from None
    if get("attention.key_length") is not None:  # Qwen3's and Gemma's heads are wider than hidden / heads
        config["head_dim"] = int(get("attention.key_length"))
    if get("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    if factors and "freq_factors" in factors:  # Llama 3.1+: its llama3 scaling as llama.cpp stores it
        config["rope_scaling"] = {"rope_type": "freq_factors", "freq_factors": factors["freq_factors"]}
    if spec.gguf_keys is not None:
        config.update(spec.gguf_keys(get, config, factors or {}))
    for key in ("bos_token_id", "eos_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = int(value)
    return config


def _generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        k: int(meta[f"tokenizer.ggml.{k}"]) for k in ("bos_token_id", "eos_token_id") if f"tokenizer.ggml.{k}" in meta
    }


def _save_tokenizer(gguf_path: Path, out_dir: Path, meta: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except ValueError as e:  # a vocabulary type transformers cannot build: its message names the type
        reason = next(iter(str(e).splitlines()), type(e).__name__)
        raise ModelLoadError(f"{gguf_path}: its tokenizer cannot be built: {reason}") from None
    tok.save_pretrained(str(out_dir))
    if meta.get("tokenizer.ggml.pre") in IGNORE_MERGES_PRE:
        _ignore_merges(out_dir / "tokenizer.json")
    if meta.get("general.architecture") == "llama" and meta.get("tokenizer.ggml.model") == "llama":
        _sentencepiece_prefix(out_dir / "tokenizer.json")
    # Keep the template inside tokenizer_config.json too, where older readers look for it.
    template = meta.get("tokenizer.chat_template")
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if template and "chat_template" not in cfg:
        cfg["chat_template"] = template
        write_json(cfg_path, cfg)


# Pre-tokenizers whose BPE takes a word that is in the vocabulary whole, before any merge (Llama 3's
# tokenizer.json says "ignore_merges": true; transformers' GGUF converter leaves it out, so words such as
# "Việt" came out in three pieces where llama.cpp and the original tokenizer give one token)
IGNORE_MERGES_PRE = ("llama-bpe",)


def _ignore_merges(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") == "BPE":
        data["model"]["ignore_merges"] = True
        write_json(path, data)


def _sentencepiece_prefix(path: Path) -> None:
    """Llama 2-style SentencePiece files: a space before the text always, as SentencePiece's dummy prefix and
    llama.cpp add it, and Llama 2's own tokenizer.json does (a Prepend normalizer). transformers' GGUF
    converter uses Metaspace, which adds none to a text that starts with a space, so " " and " two" lost a
    space each way."""
    data = json.loads(path.read_text(encoding="utf-8"))
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") != "Metaspace" or pre.get("prepend_scheme") != "first":
        return
    space = pre.get("replacement", "\u2581")
    data["pre_tokenizer"] = None
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": space},
            {"type": "Replace", "pattern": {"String": " "}, "content": space},
        ],
    }
    write_json(path, data)
