"""One compact copy of a 4-bit projection, read by every step: decode, batched decode and prefill.

The weight keeps GGUF's Q4_1 blocks of 32 (levels 0..15, a scale d and a minimum m per block: w = d
level + m); the native kernel (`native/qmatmul.h`) quantizes activations per block of 32 to int8 and
takes integer dot products (AVX-512 VNNI, else AVX2, chosen at run time). Where it cannot be built, a
torch fallback dequantizes a slice of rows at a time and multiplies in float32: slower, never wrong.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 32  # weights per scale and minimum, as in GGUF's Q4_0 / Q4_1
GROUP = 16  # output columns the kernel interleaves
SOURCE = Path(__file__).with_name("native") / "qmatmul.cpp"
EXTENSION_NAME = "tricklm_qmatmul"
# The fallback dequantizes this many column groups (1,024 output rows) at a time: a few MB of float32
FALLBACK_GROUPS = 64


@functools.cache
def load_qmatmul() -> Any | None:
    """The compiled kernel, or None where it cannot be built (or TRICKLM_NATIVE=0): then torch's matmul."""
    from tricklm.model.native.build import enabled_by_env, load_or_warn

    if not enabled_by_env():
        return None
    return load_or_warn(EXTENSION_NAME, SOURCE, "native 4-bit matmul unavailable, 4-bit projections run in torch")


class Q4Weight:
    """A [n, k] weight in blocks of 32, repacked for the kernel (see `native/qmatmul.h`): 16 output
    columns interleaved, `levels` [groups, k/32, 4, 64] uint8, `d` and `m` [groups, k/32, 16] float16 (as in
    GGUF's blocks),
    groups = ceil(n / 16) (the last one padded with zeros)."""

    def __init__(self, levels: torch.Tensor, d: torch.Tensor, m: torch.Tensor, n: int) -> None:
        groups, blocks = levels.shape[:2]
        expected = (groups, blocks, GROUP)
        if levels.dtype != torch.uint8 or levels.shape[2:] != (4, 64) or d.shape != expected or m.shape != expected:
            raise ValueError("Q4Weight wants levels [groups, k/32, 4, 64] uint8, d and m [groups, k/32, 16]")
        if not (groups - 1) * GROUP < n <= groups * GROUP:
            raise ValueError(f"{groups} groups of {GROUP} columns cannot hold {n}")
        self.levels, self.d, self.m, self.n = levels.contiguous(), d.half().contiguous(), m.half().contiguous(), n

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.levels.shape[1] * BLOCK

    @classmethod
    def from_blocks(cls, levels: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Q4Weight:
        """From levels [n, k] (0..15, in element order) and per-block scales and minimums [n, k/32]."""
        n, k = levels.shape
        groups, blocks = -(-n // GROUP), k // BLOCK
        pad = groups * GROUP - n
        lv = F.pad(levels.to(torch.uint8), (0, 0, 0, pad)).view(groups, GROUP, blocks, 8, 4)
        lv = lv.permute(0, 2, 3, 1, 4)  # [groups, blocks, quad, column, 4]
        packed = (lv[:, :, :4] | (lv[:, :, 4:] << 4)).reshape(groups, blocks, 4, 64)
        return cls(packed, _interleave(d, groups, pad), _interleave(m, groups, pad), n)

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(levels [n, k], d [n, k/32], m [n, k/32]): `from_blocks`' inputs back."""
        groups, blocks = self.levels.shape[:2]
        v = self.levels.view(groups, blocks, 4, GROUP, 4)
        quads = torch.cat((v & 0x0F, v >> 4), dim=2)  # [groups, blocks, 8, column, 4]
        levels = quads.permute(0, 3, 1, 2, 4).reshape(groups * GROUP, blocks * BLOCK)[: self.n]
        return levels, _deinterleave(self.d.float())[: self.n], _deinterleave(self.m.float())[: self.n]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [n, k]."""
        levels, d, m = self.blocks()
        n, k = levels.shape
        return (levels.float().view(n, k // BLOCK, BLOCK) * d.unsqueeze(-1) + m.unsqueeze(-1)).view(n, k)

    def group_slice(self, start: int, stop: int) -> Q4Weight:
        """Columns [16 start, 16 stop) as a weight of their own (a view)."""
        n = min(stop * GROUP, self.n) - start * GROUP
        return Q4Weight(self.levels[start:stop], self.d[start:stop], self.m[start:stop], n)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.levels, self.d, self.m))


Blocks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # levels [n, k] uint8, d and m [n, k/32] float32


def q4_from_gguf(data: np.ndarray, qtype: str) -> Q4Weight:
    """A Q4_0 or Q4_1 tensor's raw rows as a Q4Weight (see `gguf_blocks`)."""
    return Q4Weight.from_blocks(*gguf_blocks(data, qtype))


def gguf_blocks(data: np.ndarray, qtype: str) -> Blocks:
    """A Q4_0 or Q4_1 tensor's raw rows ([n, bytes per row] uint8, as the `gguf` reader gives them) as
    levels, scales and minimums, with no float detour: the levels are GGUF's, d and m its fp16 values.

    Q4_1 blocks are (d fp16, m fp16, 16 bytes of levels): w = d level + m. Q4_0 blocks are (d fp16, 16
    bytes): w = d (level - 8), the case m = -8 d.
    """
    head = {"Q4_0": 2, "Q4_1": 4}.get(qtype)
    if head is None:
        raise ValueError(f"not a 4-bit GGUF type: {qtype}")
    raw = torch.from_numpy(np.array(data, dtype=np.uint8))  # a copy: the reader's arrays map the file, read-only
    n = raw.shape[0]
    blocks = raw.view(n, -1, head + BLOCK // 2)
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1).float()
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float() if qtype == "Q4_1" else -8 * d
    packed = blocks[..., head:]
    levels = torch.cat((packed & 0x0F, packed >> 4), dim=-1).reshape(n, -1)
    return levels, d, m


# Rows rounded at a time: the float32 work buffers stay a few MB whatever the weight's size
ROUNDING_ROWS = 1024


def quantize_q4_1(weight: torch.Tensor) -> Q4Weight:
    """Round to nearest in blocks of 32, as llama.cpp's `quantize` makes Q4_1 (see `q4_1_blocks`)."""
    return Q4Weight.from_blocks(*q4_1_blocks(weight))


def q4_1_blocks(weight: torch.Tensor) -> Blocks:
    """d = (max - min) / 15 and m = min per block, both stored as fp16, levels rounded to nearest. A weight
    that is Q4_1 already (a GGUF's, staged in fp16) comes back with its own levels."""
    parts = [_q4_1_rows(rows) for rows in weight.split(ROUNDING_ROWS)]
    levels, d, m = (torch.cat(t) for t in zip(*parts, strict=True))
    return levels, d, m


def _q4_1_rows(rows: torch.Tensor) -> Blocks:
    n, k = rows.shape
    blocks = rows.float().view(n, k // BLOCK, BLOCK)
    low, high = blocks.amin(-1), blocks.amax(-1)
    d = (high - low) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    levels = ((blocks - low.unsqueeze(-1)) * inv.unsqueeze(-1)).round_().clamp_(0, 15).to(torch.uint8)
    return levels.view(n, k), d.half().float(), low.half().float()


def _interleave(values: torch.Tensor, groups: int, pad: int) -> torch.Tensor:
    """[n, blocks] -> [groups, blocks, 16] float16 (scales and minimums are fp16 in Q4_0/Q4_1 already)"""
    return F.pad(values.half(), (0, 0, 0, pad)).view(groups, GROUP, -1).transpose(1, 2).contiguous()


def _deinterleave(values: torch.Tensor) -> torch.Tensor:
    groups, blocks, _ = values.shape
    return values.transpose(1, 2).reshape(groups * GROUP, blocks)


def q4_matmul(x: torch.Tensor, weight: Q4Weight, isa: str = "") -> torch.Tensor:
    """x [rows, k] float32 @ weight^T -> [rows, n] float32; `isa` forces a kernel (tests), "torch" the fallback."""
    ext = None if isa == "torch" else load_qmatmul()
    if ext is not None:
        return ext.q4_matmul(  # type: ignore[no-any-return]
            x.float().contiguous(), weight.levels, weight.d, weight.m, weight.n, isa
        )
    out = torch.empty(x.shape[0], weight.n, dtype=torch.float32)
    groups = weight.levels.shape[0]
    for start in range(0, groups, FALLBACK_GROUPS):
        part = weight.group_slice(start, min(start + FALLBACK_GROUPS, groups))
        cols = slice(start * GROUP, start * GROUP + part.n)
        torch.matmul(x.float(), part.dequantize().t(), out=out[:, cols])
    return out


class Q4Linear(nn.Module):
    """A projection whose only weights are a Q4Weight (plus an optional float32 bias)."""

    def __init__(self, weight: Q4Weight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.q4 = weight
        self.bias = None if bias is None else bias.detach().float()
        self.isa = ""  # the kernel to use: "" the best this CPU runs; "torch" float activations (a reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = q4_matmul(x.reshape(-1, x.shape[-1]), self.q4, self.isa)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], -1)
