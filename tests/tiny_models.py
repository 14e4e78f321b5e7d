"""Tiny random Hugging Face model folders for hermetic tests (no downloads).

`make_tiny_model(path, arch, **overrides)` writes config.json, model.safetensors (float32),
tokenizer.json (a byte-level BPE trained here on a short English text), tokenizer_config.json with a
ChatML chat template, and generation_config.json. Weights are re-drawn with a large standard deviation
so that logits are spread out and every bias is non-zero. Near-ties still occur (top-2 gaps of a few 1e-3 at the
lower weight scales): compare two paths with tests/agreement.py, never by exact greedy equality.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
TOKENIZER_VOCAB_SIZE = 320

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "GPT2LMHeadModel",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
)

# Every feature of the family switched on, at sizes where each one changes the logits: a sliding layer
# (window 8, prompts of 24) then a global one, a query scale and RoPE bases of their own, soft-capping
# that bites, partial rotary with LongRoPE factors (all positions inside the original context).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "MistralForCausalLM": {"sliding_window": 8},
    "Gemma2ForCausalLM": {
        "head_dim": 16,
        "sliding_window": 8,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 8.0,
        "pad_token_id": 0,
    },
    "Gemma3ForCausalLM": {
        "head_dim": 16,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "query_pre_attn_scalar": 24,
        "rope_theta": 10000.0,
        "rope_local_base_freq": 100.0,
        "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "final_logit_softcapping": 8.0,
        "pad_token_id": 0,
    },
    "Phi3ForCausalLM": {
        "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 64,
        "rope_scaling": {
            "rope_type": "longrope",
            "short_factor": [1.0, 1.5, 2.0, 4.0],
            "long_factor": [2.0, 3.0, 5.0, 9.0],
        },
        "pad_token_id": 0,
    },
}

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can still answer questions about the weather,
the time of day, and the names of the planets. The sun rises in the east and sets in the west.
Once upon a time there was a little village by the sea, where the people fished and sang songs.
Hello, world! How are you today? I am fine, thank you. What is your name? My name is Tiny.
Numbers like 1, 2, 3, 42 and 1000 appear in text too, as do symbols such as #, $, % and &.
The engine schedules requests, computes tokens in batches, and streams the answers back to the user.
Cats and dogs are friends in this story; they share their food and sleep in the warm afternoon light.
"""


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """A byte-level BPE with ~320 tokens; ids 0, 1, 2 are the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer=trainer)
    return str(tok.to_str())


def tokenizer_vocab_size() -> int:
    from tokenizers import Tokenizer

    return int(Tokenizer.from_str(tokenizer_json()).get_vocab_size(with_added_tokens=True))


def special_token_id(token: str) -> int:
    return SPECIAL_TOKENS.index(token)


def _config(arch: str, vocab_size: int, overrides: dict[str, Any]) -> Any:
    import transformers

    bos, eos = special_token_id(BOS_TOKEN), special_token_id(EOS_TOKEN)
    common: dict[str, Any] = {"vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos}
    if arch == "GPT2LMHeadModel":
        kwargs: dict[str, Any] = {
            "n_embd": 64,
            "n_head": 4,
            "n_layer": 2,
            "n_inner": 128,
            "n_positions": 256,
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
        }
        return transformers.GPT2Config(**{**common, **kwargs, **overrides})
    kwargs = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    kwargs.update(_FAMILY_DEFAULTS.get(arch, {}))
    config_class = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
        "MistralForCausalLM": transformers.MistralConfig,
        "Gemma2ForCausalLM": transformers.Gemma2Config,
        "Gemma3ForCausalLM": transformers.Gemma3TextConfig,
        "Phi3ForCausalLM": transformers.Phi3Config,
    }[arch]
    return config_class(**{**common, **kwargs, **overrides})


def _randomize(model: torch.nn.Module, std: float, norm_offset: float) -> None:
    """Normal(0, std) everywhere, except norm scales which become `norm_offset` + Normal(0, std)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
            is_norm_scale = param.dim() == 1 and name.endswith("weight")
            param.copy_(noise + norm_offset if is_norm_scale else noise)


def make_tiny_model(path: Path, arch: str, *, weight_std: float = 0.2, **overrides: Any) -> Path:
    """Write a tiny random HF model folder for `arch` into `path` and return `path`.

    `overrides` go to the transformers config class, e.g. `tie_word_embeddings=True`,
    `rope_scaling={"rope_type": "linear", "factor": 2.0}` or `sliding_window=8`.
    """
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = tokenizer_vocab_size()
    config = _config(arch, vocab_size, copy.deepcopy(overrides))  # transformers edits dicts in place
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).to(torch.float32).eval()
    # Gemma's norms scale by (1 + weight): centred on 0, the scale is near 1 as in the other families
    _randomize(model, weight_std, norm_offset=0.0 if arch.startswith("Gemma") else 1.0)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(path, safe_serialization=True)

    (path / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    bos, eos = special_token_id(BOS_TOKEN), special_token_id(EOS_TOKEN)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": BOS_TOKEN,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    generation_config = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": bos}
    (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2), encoding="utf-8")
    return path


# Where each K-quant block keeps its fp16 factors (the rest of a block is any bytes at all)
K_FACTORS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_k_quant(rows: int, cols: int, qtype: str, seed: int = 0) -> np.ndarray:
    """Raw rows of a K-quant type (the `gguf` package reads them but cannot write them): random bytes,
    with sane fp16 factors."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for at in K_FACTORS[qtype]:
        factors = (rng.random(len(raw)) * 0.01 + 1e-3).astype(np.float16)
        raw[:, at : at + 2] = factors.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


THINK_TAGS = ("<think>", "</think>")
# Qwen3's shape: the model opens its thinking itself, and `enable_thinking` false writes an empty one
QWEN3_STYLE_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ '<|im_start|>assistant\\n' }}",
    "{{ '<|im_start|>assistant\\n' }}{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}",
)
# The DeepSeek-R1 distills' shape: the template opens the thinking, the reply begins inside it
R1_STYLE_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ '<|im_start|>assistant\\n' }}", "{{ '<|im_start|>assistant\\n<think>\\n' }}"
)


def real_template(name: str) -> str:
    """A model family's published chat template (tests/fixtures/chat_templates)."""
    return (Path(__file__).parent / "fixtures" / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def make_thinking_model(path: Path, template: str = R1_STYLE_TEMPLATE, opens: bool = False) -> Path:
    """A tiny random Qwen3 whose vocabulary has `<think>` and `</think>` as added (non-special) tokens, as
    Qwen3's has, and whose chat template writes them: `template` decides who opens the thinking. With
    `opens`, the model writes `<think>` wherever nothing stops it (its first token, so it opens its
    thinking as Qwen3 does; a budget or a grammar then decides the rest)."""
    base = tokenizer_vocab_size()
    # Room for Qwen3's tool prompt, long in this tiny vocabulary
    make_tiny_model(path, "Qwen3ForCausalLM", vocab_size=base + len(THINK_TAGS), max_position_embeddings=1024)
    if opens:
        _prefer_token(path, base)
    tokenizer = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    for k, tag in enumerate(THINK_TAGS):
        tokenizer["added_tokens"].append(
            {
                "id": base + k,
                "content": tag,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
    (path / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def _prefer_token(path: Path, token_id: int) -> None:
    """Make `token_id` the likeliest next token everywhere: every embedding gets a large constant in one
    dimension, which the residual stream carries to the final norm, and the token's output row reads
    only that dimension."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    weights = load_file(str(file))
    weights["model.embed_tokens.weight"][:, 0] = 100.0  # far above what the layers add
    head = weights["lm_head.weight"]
    head[:, 0] = 0.0  # no other token reads that dimension
    head[token_id] = 0.0
    head[token_id, 0] = 4.0
    save_file(weights, str(file), metadata={"format": "pt"})


def make_cross_encoder(path: Path, roberta: bool = False, sigmoid: bool = True, labels: int = 1) -> Path:
    """A tiny random reranker (one label) in transformers' own layout, with all-MiniLM-L6-v2's BERT tokenizer
    (its pair template writes the document as segment 1); `sigmoid=False` names Identity as the activation,
    as the ms-marco cross-encoders do."""
    import shutil

    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    from tricklm.model.resolve import resolve_model

    shape = {
        "vocab_size": 30522,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "num_labels": labels,
    }
    torch.manual_seed(7 + roberta)
    model: Any
    if roberta:
        # positions count from pad + 1 and there is one segment, as in XLM-R (bge-reranker)
        config = XLMRobertaConfig(**shape, max_position_embeddings=130, type_vocab_size=1, pad_token_id=0)
        model = XLMRobertaForSequenceClassification(config)
    else:
        model = BertForSequenceClassification(BertConfig(**shape, max_position_embeddings=128))
    if not sigmoid:
        model.config.sbert_ce_default_activation_function = "torch.nn.modules.linear.Identity"
    with torch.no_grad():
        for p in model.parameters():  # larger than the init's std 0.02, so that scores differ visibly
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    shutil.copy(resolve_model("all-MiniLM-L6-v2") / "tokenizer.json", path / "tokenizer.json")
    return path


def write_bert_gguf(folder: Path, path: Path) -> Path:
    """`folder`'s BERT (a sentence-transformers folder, mean pooling) as llama.cpp's converter writes it: its
    tensor names, float16 matrices, its metadata, and its "phantom space" vocabulary (a word-start piece
    prefixed with U+2581, a `##` continuation without its `##`, control tokens as they are)."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    control = {t["content"] for t in tok["added_tokens"] if t["special"]}
    pieces = [p if p in control else p[2:] if p.startswith("##") else "\u2581" + p for p, _ in vocab]
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_layer_norm_eps(cfg["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(pieces)
    writer.add_token_types([3 if p in control else 1 for p, _ in vocab])
    writer.add_token_type_count(cfg["type_vocab_size"])
    for add, token in (
        (writer.add_bos_token_id, "[CLS]"),
        (writer.add_eos_token_id, "[SEP]"),
        (writer.add_unk_token_id, "[UNK]"),
        (writer.add_sep_token_id, "[SEP]"),
        (writer.add_pad_token_id, "[PAD]"),
        (writer.add_mask_token_id, "[MASK]"),
    ):
        add(tok["model"]["vocab"][token])
    layer = {
        "attention.self.query": "attn_q",
        "attention.self.key": "attn_k",
        "attention.self.value": "attn_v",
        "attention.output.dense": "attn_output",
        "attention.output.LayerNorm": "attn_output_norm",
        "intermediate.dense": "ffn_up",
        "output.dense": "ffn_down",
        "output.LayerNorm": "layer_output_norm",
    }
    top = {
        "word_embeddings": "token_embd",
        "position_embeddings": "position_embd",
        "token_type_embeddings": "token_types",
        "LayerNorm": "token_embd_norm",
    }
    for name, tensor in load_file(str(folder / "model.safetensors")).items():
        base, _, kind = name.removeprefix("bert.").rpartition(".")
        if base.startswith("embeddings."):
            gguf_name = top[base.removeprefix("embeddings.")]
        elif base.startswith("encoder.layer."):
            i, rest = base.removeprefix("encoder.layer.").split(".", 1)
            gguf_name = f"blk.{i}.{layer[rest]}"
        else:
            continue  # the pooler, which llama.cpp's converter drops
        data = tensor.float().numpy()
        matrix = data.ndim == 2 and gguf_name not in ("position_embd", "token_types")
        writer.add_tensor(f"{gguf_name}.{kind}", data.astype(np.float16) if matrix else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_decoder_embedder(path: Path) -> Path:
    """A tiny random Qwen3 as a sentence-transformers embedding folder, as Qwen3-Embedding is laid out:
    the decoder's files, then modules.json with last-token pooling and Normalize."""
    make_tiny_model(path, "Qwen3ForCausalLM")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (path / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (path / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 64, "pooling_mode_lasttoken": True}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling), encoding="utf-8")
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}), encoding="utf-8")
    return path
