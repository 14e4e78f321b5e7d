"""BERT-family encoders (BERT, MiniLM, RoBERTa-shaped checkpoints): sentence embeddings and cross-encoders.

An encoder reads a whole padded batch at once, every token attending to every other token of its own
text (no cache, no causal mask). A sentence embedding is its token states pooled as the folder's
`1_Pooling/config.json` says (mean over the real tokens, the [CLS] token, or the last token) and, when
`modules.json` lists a Normalize module, scaled to unit length: what `SentenceTransformer.encode` computes.
A cross-encoder (a `*ForSequenceClassification` folder with one label: a reranker) reads a query and a
document as one pair and scores the first token's state with its classification head.

A decoder embedding model (Qwen3-Embedding: a decoder's folder with sentence-transformers' `modules.json`,
last-token pooling) reads each text causally; its forward pass is transformers' own model (`DecoderEncoder`),
pooled and normalized here as sentence-transformers does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from tricklm.model.config import ModelLoadError

ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "XLMRobertaModel", "RobertaModel")
CROSS_ENCODER_ARCHITECTURES = (
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
)
POOLING_MODES = ("mean", "cls", "lasttoken")


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    position_offset: int  # RoBERTa counts positions from pad_token_id + 1
    max_seq_length: int  # what sentence-transformers reads of a text; longer ones are cut or refused
    pooling: str
    normalize: bool
    roberta: bool
    decoder: bool  # a decoder embedding model (causal attention, last-token pooling)
    num_labels: int  # a cross-encoder's outputs (1 for a reranker); 0 for an embedding model
    sigmoid: bool  # a cross-encoder's score goes through a sigmoid (sentence-transformers' default for 1 label)

    @classmethod
    def from_folder(cls, folder: Path) -> EncoderConfig:
        cfg = _json(folder / "config.json")
        roberta = cfg.get("model_type") in ("roberta", "xlm-roberta")
        max_positions = int(cfg["max_position_embeddings"])
        offset = int(cfg.get("pad_token_id", 1)) + 1 if roberta else 0
        st_file = folder / "sentence_bert_config.json"
        st = _json(st_file) if st_file.exists() else {}
        modules = _json(folder / "modules.json") if (folder / "modules.json").exists() else []
        cross = any(a in CROSS_ENCODER_ARCHITECTURES for a in cfg.get("architectures") or [])
        decoder = _is_decoder(cfg)
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=max_positions,
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(cfg.get("pad_token_id") or 0),
            position_offset=offset,
            max_seq_length=int(st.get("max_seq_length", max_positions - offset)),
            pooling="cls" if cross else _pooling(folder, modules),
            normalize=any(str(m.get("type", "")).endswith("Normalize") for m in modules),
            roberta=roberta,
            decoder=decoder,
            num_labels=_labels(cfg) if cross else 0,
            sigmoid=cross and _cross_encoder_sigmoid(cfg),
        )

    @property
    def is_cross_encoder(self) -> bool:
        return self.num_labels > 0


def _cross_encoder_sigmoid(cfg: dict[str, Any]) -> bool:
    """sentence-transformers' CrossEncoder puts one label's logit through a sigmoid unless the folder names
    another activation (ms-marco cross-encoders name Identity: their scores are the raw logits)."""
    st = cfg.get("sentence_transformers") or {}
    named = st.get("activation_fn") or cfg.get("sbert_ce_default_activation_function")
    if named:
        return str(named).endswith("Sigmoid")
    return _labels(cfg) == 1


def _labels(cfg: dict[str, Any]) -> int:
    return len(cfg.get("id2label") or {"0": ""})  # transformers writes no id2label for one label


def encoder_task(folder: Path) -> str | None:
    """The task of the model in `folder` when this module serves it ("embed" or "rerank"), None for anything
    else (a generating model)."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    cfg = _json(config)
    architectures = cfg.get("architectures") or []
    if any(a in CROSS_ENCODER_ARCHITECTURES for a in architectures):
        return "rerank"
    if any(a in ENCODER_ARCHITECTURES for a in architectures):
        return "embed"
    if _is_decoder(cfg) and _pools(folder):
        return "embed"
    return None


def _is_decoder(cfg: dict[str, Any]) -> bool:
    """A decoder's config (grouped-query attention, as every decoder family served here has)."""
    names = [str(a) for a in cfg.get("architectures") or []]
    return "num_key_value_heads" in cfg and not any(a in ENCODER_ARCHITECTURES for a in names)


def _pools(folder: Path) -> bool:
    """A sentence-transformers folder: its modules include a Pooling one."""
    path = folder / "modules.json"
    return path.is_file() and any(str(m.get("type", "")).endswith("Pooling") for m in _json(path))


def _pooling(folder: Path, modules: list[dict[str, Any]]) -> str:
    pooling = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    if pooling is None:
        return "cls"  # a plain BERT folder: its [CLS] state, as transformers' feature extraction
    cfg = _json(folder / pooling.get("path", "1_Pooling") / "config.json")
    for key, mode in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls")):
        if cfg.get(key):
            return mode
    if cfg.get("pooling_mode_lasttoken"):
        return "lasttoken"
    raise ModelLoadError(f"{folder}: pooling {cfg} is not supported (mean, cls or last token)")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} could not be read: {e}") from None


def matmuls_in(dtype: torch.dtype) -> torch.autocast:
    """The matmuls (and attention) of the block in bfloat16 when `dtype` is, float32 weights either way."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.up = nn.Linear(h, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = self.attn_norm(x + self.out(attn.transpose(1, 2).reshape(b, t, h)))
        # BERT's GELU is the exact (erf) one
        out: torch.Tensor = self.mlp_norm(x + self.down(F.gelu(self.up(x))))
        return out


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, h)
        self.position = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type = nn.Embedding(cfg.type_vocab_size, h)
        self.norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        # A cross-encoder's head on the first token: BERT's pooler then classifier, RoBERTa's dense then out_proj
        # (the same two layers with a tanh between)
        self.head: nn.ModuleList | None = None
        if cfg.is_cross_encoder:
            self.head = nn.ModuleList([nn.Linear(h, h), nn.Linear(h, cfg.num_labels)])
        # The matmuls' type (float32 weights either way): bfloat16 where the CPU multiplies it natively
        # (`choose_compute_dtype`); the states, pooling and head stay float32
        self.compute_dtype = torch.float32

    def states(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's token states [B, T, H] of a padded batch `ids` [B, T] (`types`: segment ids)."""
        cfg = self.config
        positions = torch.arange(ids.shape[1]).unsqueeze(0) + cfg.position_offset
        segments = torch.zeros_like(ids) if types is None else types
        x: torch.Tensor = self.norm(self.word(ids) + self.position(positions) + self.token_type(segments))
        # padding never attended to: an additive bias per key, broadcast over heads and queries
        bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(mask == 0, -math.inf)[:, None, None, :]
        with matmuls_in(self.compute_dtype):
            for layer in self.layers:
                x = layer(x, bias)
        return x.float()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled (and, as configured, normalized) embeddings [B, H] of a padded batch `ids` [B, T]."""
        pooled = _pool(self.states(ids, mask), mask, self.config.pooling)
        return F.normalize(pooled, dim=-1) if self.config.normalize else pooled

    @torch.inference_mode()
    def score(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """A cross-encoder's scores [B, labels] for a padded batch of pairs, after its activation."""
        assert self.head is not None
        dense, out = self.head
        logits: torch.Tensor = out(torch.tanh(dense(self.states(ids, mask, types)[:, 0])))
        return logits.sigmoid() if self.config.sigmoid else logits


def _pool(states: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return states[:, 0]
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        return states[torch.arange(states.shape[0]), last]
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class DecoderEncoder(nn.Module):
    """A decoder embedding model: transformers' model of the folder (float32), its last layer's states
    pooled as the folder says (last token for Qwen3-Embedding) and normalized."""

    def __init__(self, folder: Path, cfg: EncoderConfig) -> None:
        super().__init__()
        from transformers import AutoModel

        self.config = cfg
        try:
            self.inner = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{folder}: {e}") from None
        self.compute_dtype = torch.float32

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with matmuls_in(self.compute_dtype):
            states = self.inner(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = _pool(states.float(), mask, self.config.pooling)
        return F.normalize(pooled, dim=-1) if self.config.normalize else pooled


def load_encoder(folder: Path) -> Encoder | DecoderEncoder:
    """The folder's model: an encoder with its weights (safetensors, with or without a `bert.`/`roberta.`
    prefix), or a decoder embedding model."""
    cfg = EncoderConfig.from_folder(folder)
    if cfg.decoder:
        return DecoderEncoder(folder, cfg)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no .safetensors weights")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        raw |= load_file(str(f))
    weights = {_strip(k): v.float() for k, v in raw.items()}
    model = Encoder(cfg)
    state = {
        "word.weight": weights["embeddings.word_embeddings.weight"],
        "position.weight": weights["embeddings.position_embeddings.weight"],
        "token_type.weight": weights["embeddings.token_type_embeddings.weight"],
        "norm.weight": weights["embeddings.LayerNorm.weight"],
        "norm.bias": weights["embeddings.LayerNorm.bias"],
    }
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        a = p + "attention."
        for kind in ("weight", "bias"):
            state[f"layers.{i}.qkv.{kind}"] = torch.cat(
                [weights[f"{a}self.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            state[f"layers.{i}.out.{kind}"] = weights[f"{a}output.dense.{kind}"]
            state[f"layers.{i}.attn_norm.{kind}"] = weights[f"{a}output.LayerNorm.{kind}"]
            state[f"layers.{i}.up.{kind}"] = weights[f"{p}intermediate.dense.{kind}"]
            state[f"layers.{i}.down.{kind}"] = weights[f"{p}output.dense.{kind}"]
            state[f"layers.{i}.mlp_norm.{kind}"] = weights[f"{p}output.LayerNorm.{kind}"]
    if cfg.is_cross_encoder:
        state |= _head_weights(weights, cfg)
    model.load_state_dict(state)
    return model.eval()


def _head_weights(weights: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    names = ("classifier.dense", "classifier.out_proj") if cfg.roberta else ("pooler.dense", "classifier")
    try:
        return {f"head.{i}.{kind}": weights[f"{n}.{kind}"] for i, n in enumerate(names) for kind in ("weight", "bias")}
    except KeyError as e:
        raise ModelLoadError(f"a cross-encoder without its classification head: no {e.args[0]}") from None


def _strip(key: str) -> str:
    for prefix in ("bert.", "roberta.", "model."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key
