"""Weights as blocks of 32 (a level per weight, w = d level + m per block): read from GGUF's quantized
types as they are, or rounded from float weights the way llama.cpp's `quantize` rounds them.

`QWeight` (qlinear.py) stores the blocks in 4 bits where every level fits, else 8. GGUF types read as
they are, levels untouched:

    Q4_0, Q4_1, Q4_K        4-bit levels (Q4_K: d = super-block d x 6-bit scale, m = -dmin x 6-bit min)
    Q5_0, Q5_1, Q5_K, Q8_0  8-bit levels (Q8_0: level q + 128, m = -128 d)

d and m are kept in fp16, as GGUF keeps them: exact for the first kinds, while for the K-quants it rounds
the products (by up to 2^-11 of each, 1-2% of a level step at most). Any other type (Q6_K, Q2_K, Q3_K,
the IQ types), or one with more bits than the mode asks for, is dequantized and rounded in the mode's
format (`gguf` mode: q8_0, within a quarter of Q6_K's own step).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

BLOCK = 32  # weights per scale and offset, as in GGUF's Q4_0 ... Q8_0
SUPER_BLOCK = 256  # K-quants' super-blocks: 8 blocks of 32 share the fp16 factors of their scales
# Rows rounded at a time: the float32 work buffers stay a few MB whatever the weight's size
ROUNDING_ROWS = 1024

Blocks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # levels [n, k] uint8, d and m [n, k/32] float32

# GGUF types read exactly, by the bits their levels need
EXACT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q8_0": 8}
FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_blocks(data: np.ndarray, qtype: str) -> Blocks:
    """A quantized GGUF tensor's raw rows ([n, bytes per row] uint8, as the `gguf` reader gives them) as
    levels, scales and offsets: the file's levels, with no rounding (see the module docstring). A slice
    of rows at a time, so the float32 work buffers stay a few MB whatever the tensor's size."""
    if qtype not in EXACT_BITS:
        raise ValueError(f"GGUF type {qtype} has no exact block form")
    parts = [_exact_rows(data[start : start + ROUNDING_ROWS], qtype) for start in range(0, len(data), ROUNDING_ROWS)]
    levels, d, m = (torch.cat(t) for t in zip(*parts, strict=True))
    return levels, d, m


def _exact_rows(data: np.ndarray, qtype: str) -> Blocks:
    raw = np.array(data, dtype=np.uint8)  # a copy: the reader's arrays map the file, read-only
    if qtype in ("Q4_0", "Q4_1"):
        return _q4_blocks(torch.from_numpy(raw), qtype)
    n = raw.shape[0]
    d, m = _scales(raw.reshape(-1, _type_size(qtype)), qtype)
    d, m = d.reshape(n, -1), m.reshape(n, -1)
    if qtype == "Q8_0":  # the levels are the stored int8 values, offset
        quants = raw.reshape(n, -1, 34)[..., 2:].view(np.int8).astype(np.int16) + 128
        return torch.from_numpy(quants.astype(np.uint8).reshape(n, -1)), _half(d), _half(m)
    if qtype in K_LEVELS:
        found = K_LEVELS[qtype](raw.reshape(n, -1, _type_size(qtype))).reshape(n, -1, BLOCK)
    else:
        values = dequantize_rows(raw, qtype).reshape(n, -1, BLOCK)
        # The values are d level + m exactly (or within float32 rounding): dividing back finds each level
        safe = np.where(d != 0, d, 1)[..., None]  # Q5_0 scales may be negative, as Q4_0 ones
        found = np.rint((values - m[..., None]) / safe).clip(0, (1 << EXACT_BITS[qtype]) - 1)
    levels = np.where(d[..., None] != 0, found, 0).astype(np.uint8).reshape(n, -1)
    return torch.from_numpy(levels), _half(d), _half(m)


def _q4_k_levels(blocks: np.ndarray) -> np.ndarray:
    """The stored levels of Q4_K super-blocks [..., 144 bytes] as [..., 8 blocks, 32]: each 32 bytes of
    `qs` hold two blocks, the first in the low nibbles (as ggml's dequantize_row_q4_K reads them)."""
    qs = blocks[..., 16:].reshape(*blocks.shape[:-1], 4, 1, BLOCK)
    nibbles: np.ndarray = (qs >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)) & 0x0F
    return nibbles.reshape(*blocks.shape[:-1], 8, BLOCK)


def _q5_k_levels(blocks: np.ndarray) -> np.ndarray:
    """Q5_K super-blocks [..., 176 bytes]: Q4_K's nibbles, plus block i's fifth bit in bit i of `qh`."""
    low = _q4_k_levels(np.concatenate((blocks[..., :16], blocks[..., 48:]), axis=-1))
    qh = blocks[..., 16:48].reshape(*blocks.shape[:-1], 1, BLOCK)
    high = (qh >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 0x01
    levels: np.ndarray = low | (high << 4)
    return levels


# K-quant levels read straight from the bytes: dequantizing and dividing back gives the same levels and took
# most of a Q4_K_M file's load time
K_LEVELS = {"Q4_K": _q4_k_levels, "Q5_K": _q5_k_levels}


def dequantize_rows(raw: np.ndarray, qtype: str) -> np.ndarray:
    """Raw rows of any type the `gguf` package reads, as float32 [n, k]."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        return np.asarray(dequantize(raw, GGMLQuantizationType[qtype]), dtype=np.float32)
    except NotImplementedError:
        raise ValueError(f"GGUF type {qtype} cannot be read (the gguf package does not dequantize it)") from None


def _type_size(qtype: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return int(GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1])


def _fp16(raw: np.ndarray, at: int) -> np.ndarray:
    return raw[:, at : at + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def _scales(blocks: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(d, m) per block of 32, float32, for every block of the file's type in `blocks` (one per row)."""
    d = _fp16(blocks, 0)
    if qtype == "Q5_0":
        return d[:, None], -16 * d[:, None]
    if qtype == "Q5_1":
        return d[:, None], _fp16(blocks, 2)[:, None]
    if qtype == "Q8_0":
        return d[:, None], -128 * d[:, None]
    # Q4_K / Q5_K: d, dmin, then 12 bytes of eight 6-bit scales and mins
    from gguf.quants import Q4_K

    scales, mins = Q4_K.get_scale_min(blocks[:, 4:16].copy())
    return d[:, None] * scales.astype(np.float32), -_fp16(blocks, 2)[:, None] * mins.astype(np.float32)


def _half(values: np.ndarray) -> torch.Tensor:
    """fp16-rounded, kept in float32 (what the kernel will read)."""
    return torch.from_numpy(values.astype(np.float16).astype(np.float32))


def _q4_blocks(raw: torch.Tensor, qtype: str) -> Blocks:
    """Q4_1 blocks are (d fp16, m fp16, 16 bytes of levels); Q4_0 ones (d fp16, 16 bytes), m = -8 d."""
    head = 4 if qtype == "Q4_1" else 2
    n = raw.shape[0]
    blocks = raw.view(n, -1, head + BLOCK // 2)
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1).float()
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float() if qtype == "Q4_1" else -8 * d
    packed = blocks[..., head:]
    levels = torch.cat((packed & 0x0F, packed >> 4), dim=-1).reshape(n, -1)
    return levels, d, m


# Rounding float weights, as llama.cpp's reference quantizers do (quantize_row_*_ref in ggml-quants.c)


def round_blocks(weight: torch.Tensor, fmt: str) -> Blocks:
    """`weight` [n, k] (k a multiple of 32) rounded to nearest in format `fmt`. q4_k needs k a multiple of
    256: other weights get q5_0 instead, as llama.cpp's `quantize` does (kept in 8 bits)."""
    if fmt not in ROUNDINGS:
        raise ValueError(f"unknown block format {fmt!r}: one of {', '.join(ROUNDINGS)}")
    if fmt == "q4_k" and weight.shape[1] % SUPER_BLOCK:
        fmt = "q5_0"
    rounding = ROUNDINGS[fmt]
    parts = [rounding(rows.float()) for rows in weight.split(ROUNDING_ROWS)]
    levels, d, m = (torch.cat(t) for t in zip(*parts, strict=True))
    return levels, d, m


def _q4_1(rows: torch.Tensor) -> Blocks:
    """d = (max - min) / 15 and m = min per block, levels rounded to nearest. A weight that is Q4_1
    already (a GGUF's, staged in fp16) comes back with its own levels."""
    n, k = rows.shape
    blocks = rows.view(n, k // BLOCK, BLOCK)
    low, high = blocks.amin(-1), blocks.amax(-1)
    d = (high - low) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    # (int)(x + 0.5), as llama.cpp: halves round up (torch.round would round them to even)
    levels = ((blocks - low.unsqueeze(-1)) * inv.unsqueeze(-1)).add_(0.5).floor_().clamp_(0, 15).to(torch.uint8)
    return levels.view(n, k), d.half().float(), low.half().float()


def _q4_0(rows: torch.Tensor) -> Blocks:
    return _symmetric(rows, 16)


def _q5_0(rows: torch.Tensor) -> Blocks:
    return _symmetric(rows, 32)


def _symmetric(rows: torch.Tensor, count: int) -> Blocks:
    """Q4_0 (16 levels) and Q5_0 (32): d = the block's value of largest magnitude / -(count / 2), levels
    floor(x / d + count / 2 + 0.5) in 0..count-1, m = -(count / 2) d."""
    n, k = rows.shape
    half = count // 2
    blocks = rows.view(n, k // BLOCK, BLOCK)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
    d = extreme / -half
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    levels = (blocks * inv.unsqueeze(-1) + (half + 0.5)).floor_().clamp_(0, count - 1).to(torch.uint8)
    d16 = d.half().float()
    return levels.view(n, k), d16, -half * d16


def _q8_0(rows: torch.Tensor) -> Blocks:
    """d = max |x| / 127, levels round(x / d) + 128 (0 is never used), m = -128 d."""
    n, k = rows.shape
    blocks = rows.view(n, k // BLOCK, BLOCK)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = _round_half_away(blocks * inv.unsqueeze(-1)).clamp_(-127, 127)
    d16 = d.half().float()
    return (q + 128).to(torch.uint8).view(n, k), d16, -128 * d16


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (q8_0 uses it; torch.round, like the K-quants' nearest_int, rounds halves to even)."""
    return x.sign() * (x.abs() + 0.5).floor()


def _q4_k(rows: torch.Tensor) -> Blocks:
    """llama.cpp's Q4_K: each block's (scale, min) chosen by `_fit_scale_min`, then scales and mins
    rounded to 6 bits against their super-block's largest, and the levels rounded to those."""
    n, k = rows.shape
    if k % SUPER_BLOCK:
        raise ValueError(f"q4_k needs inputs in multiples of {SUPER_BLOCK}, not {k}")
    blocks = rows.view(n, k // SUPER_BLOCK, SUPER_BLOCK // BLOCK, BLOCK)
    scale, neg_min = _fit_scale_min(blocks)  # [n, supers, 8]: w ~ scale level - neg_min
    max_scale, max_min = scale.amax(-1, keepdim=True), neg_min.amax(-1, keepdim=True)
    ls = _six_bits(scale, max_scale)
    lm = _six_bits(neg_min, max_min)
    d_super, dmin_super = (max_scale / 63).half().float(), (max_min / 63).half().float()
    d, m = d_super * ls, -(dmin_super * lm)
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    levels = torch.round((blocks - m.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
    return levels.view(n, k), d.half().float().view(n, -1), m.half().float().view(n, -1)


def _six_bits(values: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    inv = torch.where(largest > 0, 63 / largest, torch.zeros_like(largest))
    return torch.round(values * inv).clamp_(max=63)


def _fit_scale_min(blocks: torch.Tensor, steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qkx2_quants for 4-bit levels: try 21 scales around (max - min) / 15, fit scale
    and min to each candidate's levels by weighted least squares (weights |x| + rms of the block), and
    keep the fit of least weighted error; a better fit's min is where the next candidates start from.
    Returns (scale, -min); min is never above 0."""
    x = blocks
    w = x.abs() + x.square().mean(-1, keepdim=True).sqrt()
    high = x.amax(-1, keepdim=True)
    low = x.amin(-1, keepdim=True).clamp(max=0)
    flat = high == low  # a constant block (or all zero): level 0 at the value itself
    sum_w, sum_x = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)

    def levels_for(numerator: float, minimum: torch.Tensor) -> torch.Tensor:
        span = high - minimum
        iscale = numerator / torch.where(span > 0, span, torch.ones_like(span))
        return torch.round((x - minimum) * iscale).clamp_(0, 15)

    def error(scale: torch.Tensor, minimum: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return (w * (scale * levels + minimum - x).square()).sum(-1, keepdim=True)

    best_min = low
    best_scale = (high - low) / 15
    best = error(best_scale, best_min, levels_for(15, low))
    for step in range(steps + 1):
        levels = levels_for(-1 + 0.1 * step + 15, best_min)
        sum_l, sum_l2 = (w * levels).sum(-1, keepdim=True), (w * levels.square()).sum(-1, keepdim=True)
        sum_xl = (w * levels * x).sum(-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l.square()
        safe_det = torch.where(det > 0, det, torch.ones_like(det))
        scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        minimum = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = minimum > 0  # a min above 0 is dropped: the scale refitted with min 0
        scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), scale)
        minimum = torch.where(positive, torch.zeros_like(minimum), minimum)
        better = (det > 0) & (error(scale, minimum, levels) < best) & ~flat
        best = torch.where(better, error(scale, minimum, levels), best)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, minimum, best_min)
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    return best_scale.squeeze(-1).clamp_(min=0), (-best_min).squeeze(-1)


ROUNDINGS: dict[str, Callable[[torch.Tensor], Blocks]] = {
    "q4_0": _q4_0,
    "q4_1": _q4_1,
    "q4_k": _q4_k,
    "q5_0": _q5_0,
    "q8_0": _q8_0,
}
# The bits of each rounding's levels: a GGUF type whose levels fit is read exactly rather than rounded
ROUNDING_BITS = {"q4_0": 4, "q4_1": 4, "q4_k": 4, "q5_0": 5, "q8_0": 8}
