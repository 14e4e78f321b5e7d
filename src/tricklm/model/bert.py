"""BERT-family encoders (BERT, MiniLM, RoBERTa-shaped checkpoints) and sentence-transformers pooling.

An encoder reads a whole padded batch at once, every token attending to every other token of its own
text (no cache, no causal mask); a sentence embedding is its token states pooled as the folder's
`1_Pooling/config.json` says (mean over the real tokens, the [CLS] token, or the last token) and, when
`modules.json` lists a Normalize module, scaled to unit length: what `SentenceTransformer.encode` computes.
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

    @classmethod
    def from_folder(cls, folder: Path) -> EncoderConfig:
        cfg = _json(folder / "config.json")
        roberta = cfg.get("model_type") in ("roberta", "xlm-roberta")
        max_positions = int(cfg["max_position_embeddings"])
        offset = int(cfg.get("pad_token_id", 1)) + 1 if roberta else 0
        st_file = folder / "sentence_bert_config.json"
        st = _json(st_file) if st_file.exists() else {}
        modules = _json(folder / "modules.json") if (folder / "modules.json").exists() else []
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=max_positions,
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(cfg.get("pad_token_id", 0)),
            position_offset=offset,
            max_seq_length=int(st.get("max_seq_length", max_positions - offset)),
            pooling=_pooling(folder, modules),
            normalize=any(str(m.get("type", "")).endswith("Normalize") for m in modules),
        )


def is_encoder(folder: Path) -> bool:
    """Whether `folder` holds an encoder this module serves (embeddings), not a generating model."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    architectures = _json(config).get("architectures") or []
    return any(a in ENCODER_ARCHITECTURES for a in architectures)


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

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled (and, as configured, normalized) embeddings [B, H] of a padded batch `ids` [B, T]."""
        cfg = self.config
        positions = torch.arange(ids.shape[1]).unsqueeze(0) + cfg.position_offset
        x = self.word(ids) + self.position(positions) + self.token_type(torch.zeros_like(ids))
        x = self.norm(x)
        # padding never attended to: an additive bias per key, broadcast over heads and queries
        bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(mask == 0, -math.inf)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        pooled = _pool(x, mask, cfg.pooling)
        return F.normalize(pooled, dim=-1) if cfg.normalize else pooled


def _pool(states: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return states[:, 0]
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        return states[torch.arange(states.shape[0]), last]
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def load_encoder(folder: Path) -> Encoder:
    """An encoder with the folder's weights (safetensors, with or without a `bert.`/`roberta.` prefix)."""
    cfg = EncoderConfig.from_folder(folder)
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
    model.load_state_dict(state)
    return model.eval()


def _strip(key: str) -> str:
    for prefix in ("bert.", "roberta.", "model."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key
