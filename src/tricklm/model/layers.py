"""Building blocks shared by the decoder architectures."""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RopeSpec:
    """What a rotary table is computed from: one per model, or per layer type (Gemma 3's sliding layers)."""

    theta: float
    dim: int  # rotated leading dimensions of a head (all of it, but for partial rotary)
    max_positions: int
    scaling: tuple[tuple[str, Any], ...] = ()  # rope_scaling items; () for plain RoPE

    @classmethod
    def of(cls, cfg: ModelConfig, local: bool = False) -> RopeSpec:
        """The global layers' RoPE, or with `local` the sliding layers' (their own base, unscaled)."""
        if local and cfg.local_rope_theta is not None:
            return cls(cfg.local_rope_theta, cfg.rotary_dim, cfg.max_position_embeddings)
        scaling = tuple(sorted((k, _frozen(v)) for k, v in (cfg.rope_scaling or {}).items()))
        return cls(cfg.rope_theta, cfg.rotary_dim, cfg.max_position_embeddings, scaling)


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class RotaryEmbedding(nn.Module):
    """Half-rotation RoPE (the Hugging Face layout), with cos/sin precomputed for every position.

    The tables are stored at full rotated width, sin with the first half negated, so a rotation is
    `x * cos + roll(x, D/2) * sin`: three ops on q and k together, in place. Scalings that also scale
    attention (yarn, longrope) fold their factor into both tables, as transformers does.
    """

    def __init__(self, spec: RopeSpec) -> None:
        super().__init__()
        self.spec = spec
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset()

    def reset(self) -> None:
        """(Re)compute the tables: after `to_empty`, which leaves non-persistent buffers uninitialised."""
        freqs, factor = rope_frequencies(self.spec)
        cos, sin = freqs.cos() * factor, freqs.sin() * factor
        self.cos = torch.cat((cos, cos), dim=-1)
        self.sin = torch.cat((-sin, sin), dim=-1)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for a step's positions, [T, 1, D]: looked up once per step, used by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary_(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Rotate x [T, H, D] in place (q and k heads may share one call: the rotation is per head).

    A table narrower than D rotates the leading dimensions only (partial rotary), as transformers does."""
    cos, sin = cos_sin
    x = x[..., : cos.shape[-1]]
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)  # [x2, x1]; with the signed sin: [-x2, x1]
    x.mul_(cos).addcmul_(rolled, sin)


def rope_frequencies(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    """Angles [max_positions, dim / 2] of every position, and the factor on cos and sin."""
    pos = torch.arange(spec.max_positions, dtype=torch.float32)
    scaling = dict(spec.scaling)
    if scaling.get("rope_type") == "longrope":
        return _longrope_angles(spec, scaling, pos)
    inv, factor = _inv_freq(spec, scaling)
    return torch.outer(pos, inv), factor


def _base_inv_freq(spec: RopeSpec) -> torch.Tensor:
    return 1.0 / (spec.theta ** (torch.arange(0, spec.dim, 2, dtype=torch.int64).float() / spec.dim))


def _inv_freq(spec: RopeSpec, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    inv = _base_inv_freq(spec)
    kind = scaling.get("rope_type")
    if kind is None:
        return inv, 1.0
    if kind == "linear":
        return inv / float(scaling["factor"]), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv, scaling), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(spec, scaling, inv)
    if kind == "freq_factors":  # llama.cpp's rope_freqs tensor: a divisor per frequency
        factors = torch.tensor(scaling["freq_factors"], dtype=torch.float32)
        if factors.shape != inv.shape:
            raise ModelLoadError(f"rope_freqs has {len(factors)} factors for {len(inv)} rotary frequencies")
        return inv / factors, 1.0
    raise ModelLoadError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3, yarn, longrope)")


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


def _yarn_inv_freq(spec: RopeSpec, s: dict[str, Any], inv: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN: interpolated frequencies below a band, original above it, a linear ramp between
    (transformers' `_compute_yarn_parameters`, including its defaults)."""
    old_len = float(s["original_max_position_embeddings"])
    factor = float(s.get("factor") or spec.max_positions / old_len)
    attention = s.get("attention_factor")
    if attention is None:
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            if mscale and mscale_all
            else _yarn_mscale(factor)
        )
    low, high = _yarn_band(spec, s, old_len)
    ramp = torch.clamp((torch.arange(spec.dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: the original frequency (extrapolation), 0: interpolated by `factor`
    return (inv / factor) * (1 - keep) + inv * keep, float(attention)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_band(spec: RopeSpec, s: dict[str, Any], old_len: float) -> tuple[float, float]:
    def dim_of(rotations: float) -> float:
        return (spec.dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(spec.theta))

    low, high = dim_of(float(s.get("beta_fast") or 32)), dim_of(float(s.get("beta_slow") or 1))
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, spec.dim - 1)
    return low, high + 0.001 if low == high else high


def _longrope_angles(spec: RopeSpec, s: dict[str, Any], pos: torch.Tensor) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3, Phi-4-mini): per-frequency factors, `short_factor` for positions inside the original
    context, `long_factor` past it. transformers picks one set for a whole forward by the longest position
    in it; per position gives the same for every token a cached decode computes."""
    old_len = int(s["original_max_position_embeddings"])
    factor = float(s.get("factor") or spec.max_positions / old_len)
    attention = s.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    base = _base_inv_freq(spec)
    short = torch.outer(pos, base / torch.tensor(s["short_factor"], dtype=torch.float32))
    long = torch.outer(pos, base / torch.tensor(s["long_factor"], dtype=torch.float32))
    return torch.where((pos < old_len).unsqueeze(1), short, long), float(attention)


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
