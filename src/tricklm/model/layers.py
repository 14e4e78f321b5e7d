"""Building blocks shared by the decoder architectures."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tricklm.model.config import ModelConfig, ModelLoadError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


ACTIVATIONS: dict[str, Any] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str) -> Any:
    if name not in ACTIVATIONS:
        raise ModelLoadError(f"unsupported activation function {name!r}")
    return ACTIVATIONS[name]


class RotaryEmbedding(nn.Module):
    """Half-rotation RoPE (the Hugging Face layout), with cos/sin precomputed for every position.

    The tables are stored at full head width, sin with the first half negated, so a rotation is
    `x * cos + roll(x, D/2) * sin`: three ops on q and k together, in place.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq = _inv_freq(cfg)
        pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for a step's positions, [T, 1, D]: looked up once per step, used by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary_(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Rotate x [T, H, D] in place (q and k heads may share one call: the rotation is per head)."""
    cos, sin = cos_sin
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)  # [x2, x1]; with the signed sin: [-x2, x1]
    x.mul_(cos).addcmul_(rolled, sin)


def _inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind is None:
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv, scaling)
    raise ModelLoadError(f"unsupported rope scaling type {kind!r}")


def _llama3_inv_freq(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def load_shard(param: torch.Tensor, loaded: torch.Tensor, offset: int | None, exact: bool = False) -> None:
    """Copy `loaded` into rows [offset, offset + len) of a (possibly fused) parameter."""
    offset = offset or 0
    n = loaded.shape[0] if loaded.dim() else 1
    bad_rows = offset + n > param.shape[0] or (exact and n != param.shape[0])
    if param.shape[1:] != loaded.shape[1:] or bad_rows:
        raise ModelLoadError(f"weight of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
    param.data[offset : offset + n].copy_(loaded)


def output_logits(hidden: torch.Tensor, lm_head: nn.Module | None, embedding: nn.Embedding) -> torch.Tensor:
    """Project hidden states to the vocabulary: with the model's own head, or the tied embedding table."""
    if lm_head is None:
        return hidden @ embedding.weight.t()
    return lm_head(hidden)  # type: ignore[no-any-return]
