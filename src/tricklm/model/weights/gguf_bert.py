"""A BERT GGUF file (architecture `bert`, as llama.cpp's converter writes an embedding model) as the
sentence-transformers folder the encoder loads (`model/bert.py`): config.json, float32 weights under
Hugging Face's names, a WordPiece tokenizer.json, and the pooling the file names.

llama.cpp's converter rewrites BERT's vocabulary for its own tokenizer ("phantom space": a word-start piece
gets a leading U+2581, a `##` continuation loses its `##`, control tokens stay); this undoes that, so the
folder's tokenizer is BERT's own again. An embedding model is small, so its weights are written out whole
(dequantized when the file is quantized) rather than read from the file at each load. llama-server
normalizes embeddings by default (`--embd-normalize 2`), so the folder ends with a Normalize module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from tricklm.model.config import ModelLoadError
from tricklm.model.weights.blocks import dequantize_rows
from tricklm.model.weights.files import write_json

_TOP = {
    "token_embd": "embeddings.word_embeddings",
    "position_embd": "embeddings.position_embeddings",
    "token_types": "embeddings.token_type_embeddings",
    "token_embd_norm": "embeddings.LayerNorm",
}
_LAYER = {
    "attn_q": "attention.self.query",
    "attn_k": "attention.self.key",
    "attn_v": "attention.self.value",
    "attn_output": "attention.output.dense",
    "attn_output_norm": "attention.output.LayerNorm",
    "ffn_up": "intermediate.dense",
    "ffn_down": "output.dense",
    "layer_output_norm": "output.LayerNorm",
}
# llama.cpp's pooling types (LLAMA_POOLING_TYPE_*) as sentence-transformers' Pooling options
_POOLING = {1: "pooling_mode_mean_tokens", 2: "pooling_mode_cls_token", 3: "pooling_mode_lasttoken"}
_CONTROL = 3  # gguf.TokenType.CONTROL


def write_bert_folder(reader: Any, meta: dict[str, Any], out: Path) -> None:
    """Write the folder for the BERT GGUF `reader` (its metadata `meta`) into `out`."""
    if any(t.name.startswith("cls") for t in reader.tensors):
        # its converter drops BERT's pooler layer, which a classifier head reads: the scores could not be the model's
        raise ModelLoadError("a BERT GGUF with a classification head (a reranker): serve its Hugging Face folder")
    pooling = int(meta.get("bert.pooling_type", 1))
    if pooling not in _POOLING:
        raise ModelLoadError(f"bert.pooling_type {pooling} is not supported (1 mean, 2 cls, 3 last token)")
    tokens, types = _vocabulary(reader)
    context = int(meta["bert.context_length"])
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": len(tokens),
        "hidden_size": int(meta["bert.embedding_length"]),
        "num_hidden_layers": int(meta["bert.block_count"]),
        "num_attention_heads": int(meta["bert.attention.head_count"]),
        "intermediate_size": int(meta["bert.feed_forward_length"]),
        "max_position_embeddings": context,
        "type_vocab_size": int(meta.get("tokenizer.ggml.token_type_count", 2)),
        "layer_norm_eps": float(meta.get("bert.attention.layer_norm_epsilon", 1e-12)),
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", 0)),
    }
    write_json(out / "config.json", config)
    save_file(dict(_tensors(reader)), str(out / "model.safetensors"))
    (out / "tokenizer.json").write_text(_tokenizer(tokens, types, meta), encoding="utf-8")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    write_json(out / "modules.json", modules)
    (out / "1_Pooling").mkdir()
    write_json(
        out / "1_Pooling" / "config.json", {"word_embedding_dimension": config["hidden_size"], _POOLING[pooling]: True}
    )
    write_json(out / "sentence_bert_config.json", {"max_seq_length": context})


def _tensors(reader: Any) -> Any:
    for t in reader.tensors:
        base, _, kind = t.name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk":
            name = f"encoder.layer.{parts[1]}.{_LAYER[parts[2]]}"
        elif base in _TOP:
            name = _TOP[base]
        else:
            raise ModelLoadError(f"a BERT GGUF tensor this loader does not know: {t.name}")
        shape = tuple(int(d) for d in reversed(t.shape))
        raw = np.asarray(t.data).reshape(shape[0] if len(shape) == 2 else 1, -1)
        values = dequantize_rows(raw, t.tensor_type.name).reshape(shape)
        yield f"{name}.{kind}", torch.from_numpy(np.array(values, dtype=np.float32))  # a writable copy


def _vocabulary(reader: Any) -> tuple[list[str], list[int]]:
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    return [str(t) for t in tokens], [int(t) for t in types]


def _bert_piece(token: str, kind: int) -> str:
    """Undo llama.cpp's phantom-space rewrite of one piece (older converters left every `[...]` token as
    it was, whatever its type)."""
    if kind == _CONTROL or (token.startswith("[") and token.endswith("]")):
        return token
    return token[1:] if token.startswith("\u2581") else "##" + token


def _tokenizer(tokens: list[str], types: list[int], meta: dict[str, Any]) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = [_bert_piece(t, k) for t, k in zip(tokens, types, strict=True)]
    vocab = {p: i for i, p in enumerate(pieces)}
    unk = pieces[int(meta.get("tokenizer.ggml.unknown_token_id", 100))]
    cls_id = int(meta.get("tokenizer.ggml.cls_token_id", meta.get("tokenizer.ggml.bos_token_id", 101)))
    sep_id = int(meta.get("tokenizer.ggml.seperator_token_id", meta.get("tokenizer.ggml.eos_token_id", 102)))
    cls, sep = pieces[cls_id], pieces[sep_id]
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    lowercase = bool(meta.get("tokenizer.ggml.normalizer.lowercase", True))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, cls_id), (sep, sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(p, special=True) for p, k in zip(pieces, types, strict=True) if k == _CONTROL])
    text: str = tok.to_str()
    return text
