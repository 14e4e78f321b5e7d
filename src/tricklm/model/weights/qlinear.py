"""One compact copy of a projection, read by every step: decode, batched decode and prefill.

The weight is kept in blocks of 32 (a level per weight, a scale d and an offset m per block: w = d
level + m; `blocks.py` makes them from GGUF types or float weights), in 4 bits where every level
fits, else 8. The native kernels (`../native/qkernels.h`) quantize activations per block of 32 to int8 and
take integer dot products (AVX-512 VNNI, else AVX2, chosen at run time by `../native/qmatmul.h`). Where they
cannot be built, a torch fallback dequantizes a slice of rows at a time and multiplies in float32: slower,
never wrong.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import mmap
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tricklm.model.weights.blocks import BLOCK, Blocks, gguf_blocks, round_blocks

log = logging.getLogger(__name__)

GROUP = 16  # output columns the kernel interleaves
PACK_GROUPS = 256  # column groups (4,096 rows) repacked at a time
SOURCE = Path(__file__).parent.parent / "native" / "qmatmul.cpp"
EXTENSION_NAME = "tricklm_qmatmul"
# The fallback dequantizes this many column groups (1,024 output rows) at a time: a few MB of float32
FALLBACK_GROUPS = 64
# A decode step streams every weight once: on 4 KiB pages that is a page walk every 4 KiB (two-level in a
# VM), and how fast a process decoded depended on where its pages landed; on transparent huge pages it was
# as fast in every process (benchmarks/README.md, "Weights on huge pages")
HUGE_PAGE = 2 << 20


def check_isa() -> None:
    """ValueError for a TRICKLM_ISA the kernels do not know or this CPU cannot run (builds the kernel if needed)."""
    from tricklm.model.native import isa

    isa.forced()
    load_qmatmul()


@functools.cache
def load_qmatmul() -> Any | None:
    """The compiled kernel, or None where it cannot be built (or TRICKLM_NATIVE=0): then torch's matmul."""
    from tricklm.model.native import isa
    from tricklm.model.native.build import enabled_by_env, load_or_warn

    if not enabled_by_env():
        return None
    isa.forced()  # an unknown TRICKLM_ISA is refused before a minute of compiling
    ext = load_or_warn(EXTENSION_NAME, SOURCE, "native block matmul unavailable, block projections run in torch")
    if ext is not None:
        isa.check(ext)
        log.info("%s: %s", isa.cpu_model(), isa.describe(ext))
    return ext


class QWeight:
    """A [n, k] weight in blocks of 32, repacked for the kernel (see `../native/qkernels.h`): 16 output
    columns interleaved, `levels` [groups, k/32, bits, 64] uint8 (bits 4 or 8), `d` and `m` [groups,
    k/32, 16] float16 (as in GGUF's blocks), groups = ceil(n / 16) (the last one padded with zeros)."""

    def __init__(self, levels: torch.Tensor, d: torch.Tensor, m: torch.Tensor, n: int) -> None:
        groups, blocks = levels.shape[:2]
        expected = (groups, blocks, GROUP)
        shaped = levels.dim() == 4 and levels.shape[2] in (4, 8) and levels.shape[3] == 64
        if levels.dtype != torch.uint8 or not shaped or d.shape != expected or m.shape != expected:
            raise ValueError("QWeight wants levels [groups, k/32, 4 or 8, 64] uint8, d and m [groups, k/32, 16]")
        if not (groups - 1) * GROUP < n <= groups * GROUP:
            raise ValueError(f"{groups} groups of {GROUP} columns cannot hold {n}")
        self.levels, self.d, self.m, self.n = levels.contiguous(), d.half().contiguous(), m.half().contiguous(), n

    @property
    def bits(self) -> int:
        return int(self.levels.shape[2])

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.levels.shape[1] * BLOCK

    @classmethod
    def from_blocks(cls, levels: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> QWeight:
        """From levels [n, k] (0..255, in element order) and per-block scales and offsets [n, k/32]; in
        4 bits if every level fits, else 8. Packed a slice of column groups at a time into the final
        tensor, so that repacking a large table costs a few MB beyond the weight itself."""
        n, k = levels.shape
        groups, blocks = -(-n // GROUP), k // BLOCK
        bits = 4 if int(levels.max()) <= 15 else 8
        # levels, d and m one after the other in one buffer on huge pages (see HUGE_PAGE)
        sizes = (groups * blocks * bits * 64, groups * blocks * GROUP * 2, groups * blocks * GROUP * 2)
        buffer = huge_page_buffer(sum(sizes))
        packed_bytes, d_bytes, m_bytes = buffer.split(sizes)
        packed = packed_bytes.view(groups, blocks, bits, 64)
        for start in range(0, groups, PACK_GROUPS):
            rows = levels[start * GROUP : (start + PACK_GROUPS) * GROUP]
            count = -(-rows.shape[0] // GROUP)
            lv = F.pad(rows.to(torch.uint8), (0, 0, 0, count * GROUP - rows.shape[0]))
            lv = lv.view(count, GROUP, blocks, 8, 4).permute(0, 2, 3, 1, 4)  # [groups, blocks, quad, column, 4]
            part = lv[:, :, :4] | (lv[:, :, 4:] << 4) if bits == 4 else lv
            packed[start : start + count] = part.reshape(count, blocks, bits, 64)
        pad = groups * GROUP - n
        d_out = d_bytes.view(torch.float16).view(groups, blocks, GROUP)
        m_out = m_bytes.view(torch.float16).view(groups, blocks, GROUP)
        d_out.copy_(_interleave(d, groups, pad))
        m_out.copy_(_interleave(m, groups, pad))
        return cls(packed, d_out, m_out, n)

    def blocks(self) -> Blocks:
        """(levels [n, k], d [n, k/32], m [n, k/32]): `from_blocks`' inputs back."""
        groups, blocks = self.levels.shape[:2]
        v = self.levels.view(groups, blocks, self.bits, GROUP, 4)
        quads = torch.cat((v & 0x0F, v >> 4), dim=2) if self.bits == 4 else v  # [groups, blocks, 8, column, 4]
        levels = quads.permute(0, 3, 1, 2, 4).reshape(groups * GROUP, blocks * BLOCK)[: self.n]
        return levels, _deinterleave(self.d.float())[: self.n], _deinterleave(self.m.float())[: self.n]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [n, k]."""
        levels, d, m = self.blocks()
        n, k = levels.shape
        return (levels.float().view(n, k // BLOCK, BLOCK) * d.unsqueeze(-1) + m.unsqueeze(-1)).view(n, k)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [r] of the float32 weight, [r, k]: an embedding lookup that unpacks nothing else."""
        ext = load_qmatmul()
        if ext is not None:
            return ext.weight_rows(ids.long(), self.levels, self.d, self.m, self.n)  # type: ignore[no-any-return]
        return self.rows_in_torch(ids)

    def rows_in_torch(self, ids: torch.Tensor) -> torch.Tensor:
        """`rows` without the native extension."""
        blocks = self.levels.shape[1]
        groups, columns = ids // GROUP, ids % GROUP
        picked = self.levels[groups].view(len(ids), blocks, self.bits, GROUP, 4)
        picked = picked[torch.arange(len(ids)), :, :, columns]  # [r, blocks, bits, 4]
        if self.bits == 4:
            picked = torch.cat((picked & 0x0F, picked >> 4), dim=2)
        d, m = self.d[groups, :, columns].float(), self.m[groups, :, columns].float()  # [r, blocks]
        values = picked.reshape(len(ids), blocks, BLOCK).float() * d.unsqueeze(-1) + m.unsqueeze(-1)
        return values.view(len(ids), blocks * BLOCK)

    def group_slice(self, start: int, stop: int) -> QWeight:
        """Columns [16 start, 16 stop) as a weight of their own (a view)."""
        n = min(stop * GROUP, self.n) - start * GROUP
        return QWeight(self.levels[start:stop], self.d[start:stop], self.m[start:stop], n)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.levels, self.d, self.m))


def qweight_from_gguf(data: Any, qtype: str) -> QWeight:
    """A quantized GGUF tensor's raw rows, read exactly (see `blocks.gguf_blocks`)."""
    return QWeight.from_blocks(*gguf_blocks(data, qtype))


def quantize_blocks(weight: torch.Tensor, fmt: str) -> QWeight:
    """A float weight rounded to nearest in `fmt` (q4_0, q4_1, q4_k, q8_0), as llama.cpp's `quantize`."""
    return QWeight.from_blocks(*round_blocks(weight, fmt))


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """A new uint8 tensor [nbytes] whose whole 2 MiB pages Linux is asked to back with transparent huge pages
    (MADV_HUGEPAGE, before anything touches them: with THP in "madvise" mode, the common default, only so
    advised memory gets them). A fresh anonymous mapping, 2 MiB longer than asked so that the tensor starts on
    a huge page; the slack before and after the tensor is never touched, so never resident, and a last partial
    huge page of the tensor stays on small pages. Elsewhere, or for less than a huge page, plain torch memory."""
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    # private: a shared anonymous mapping is shmem, whose huge pages are a separate setting (off by default)
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(area, dtype=torch.uint8)  # holds `area` (the mapping) as long as it lives
    start = -whole.data_ptr() % HUGE_PAGE
    with contextlib.suppress(OSError):  # THP compiled out: 4 KiB pages, as before
        area.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    return whole[start : start + nbytes]


def _interleave(values: torch.Tensor, groups: int, pad: int) -> torch.Tensor:
    """[n, blocks] -> [groups, blocks, 16] float16 (scales and offsets are fp16 in GGUF's blocks already)"""
    return F.pad(values.half(), (0, 0, 0, pad)).view(groups, GROUP, -1).transpose(1, 2).contiguous()


def _deinterleave(values: torch.Tensor) -> torch.Tensor:
    groups, blocks, _ = values.shape
    return values.transpose(1, 2).reshape(groups * GROUP, blocks)


def qmatmul(x: torch.Tensor, weight: QWeight, isa: str = "") -> torch.Tensor:
    """x [rows, k] float32 @ weight^T -> [rows, n] float32; `isa` forces a kernel (tests), "torch" the fallback."""
    ext = None if isa == "torch" else load_qmatmul()
    if ext is not None:
        return ext.qmatmul(  # type: ignore[no-any-return]
            x.float().contiguous(), weight.levels, weight.d, weight.m, weight.n, isa
        )
    out = torch.empty(x.shape[0], weight.n, dtype=torch.float32)
    groups = weight.levels.shape[0]
    for start in range(0, groups, FALLBACK_GROUPS):
        part = weight.group_slice(start, min(start + FALLBACK_GROUPS, groups))
        cols = slice(start * GROUP, start * GROUP + part.n)
        torch.matmul(x.float(), part.dequantize().t(), out=out[:, cols])
    return out


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x [rows, k] as the native kernels see it: rounded to int8 per block of 32 (scale max |x| / 127)."""
    rows, k = x.shape
    blocks = x.view(rows, k // BLOCK, BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127)).view(rows, k)


REFINED = 32  # outputs of a row that a precise projection recomputes from float activations


class QLinear(nn.Module):
    """A projection whose only weights are a QWeight (plus an optional float32 bias).

    `precise` (the output head): each row's REFINED largest outputs are recomputed from float32
    activations after the kernel's pass. The next token is drawn from those candidates, and near-ties
    among them are what int8 rounding flips (same top token as float32 activations: 96.8% with int8
    alone); a second int8 pass over the residual, the earlier way, doubled the head's multiply-adds in
    every decode step for the same purpose.
    """

    def __init__(self, weight: QWeight, bias: torch.Tensor | None, precise: bool = False) -> None:
        super().__init__()
        self.qweight = weight
        self.bias = None if bias is None else bias.detach().float()
        self.precise = precise
        self.isa = ""  # the kernel to use: "" the best this CPU runs; "torch" float activations (a reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        y = qmatmul(flat, self.qweight, self.isa)
        ext = load_qmatmul() if self.precise and self.isa != "torch" else None
        if ext is not None:  # (the fallback's activations are float32 already)
            w = self.qweight
            ext.refine_top(flat.contiguous(), y, w.levels, w.d, w.m, REFINED)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], -1)


class QEmbedding(nn.Module):
    """An embedding table kept as a QWeight (a row per token), handing out float32 rows. A tied output
    head is a QLinear over the same QWeight: one copy serves both."""

    def __init__(self, weight: QWeight) -> None:
        super().__init__()
        self.qweight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.rows(ids.reshape(-1)).view(*ids.shape, -1)
