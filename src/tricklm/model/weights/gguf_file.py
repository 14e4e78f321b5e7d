"""Weights read straight from a `.gguf` file, tensor by tensor, with no float32 copy of the model on disk.

The file is memory-mapped by the `gguf` reader; each tensor is dequantized (or, for the one-copy block
modes, read as blocks: `blocks.py`) as the loader asks for it, so loading holds the model in its
runtime form plus one tensor at a time. Names are mapped to Hugging Face's, and Q/K rows are put back
from llama.cpp's interleaved RoPE order to Hugging Face's halves.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tricklm.model.config import ModelConfig, ModelLoadError
from tricklm.model.registry import family
from tricklm.model.weights.blocks import (
    EXACT_BITS,
    ROUNDING_BITS,
    Blocks,
    dequantize_rows,
    gguf_blocks,
    round_blocks,
)

GGUF_LINK = "model.gguf"  # in a converted folder: a link to the file the weights are read from

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# RoPE factors read into the config when the file is converted, not weights: LongRoPE's (Phi-3), and the
# per-frequency divisors llama.cpp stores for Llama 3.1+ files (their `llama3` scaling, computed)
ROPE_FACTOR_TENSORS = {
    "rope_factors_short.weight": "short_factor",
    "rope_factors_long.weight": "long_factor",
    "rope_freqs.weight": "freq_factors",
}
DEQUANTIZE_ROWS = 4096  # rows of a matrix dequantized at a time: tens of MB of float32 at most


def open_reader(path: Path) -> Any:
    """The file's reader (memory-mapped; parsing its metadata, the vocabulary most of all, takes seconds:
    open it once per load)."""
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on a damaged file
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None


@dataclass(frozen=True)
class FileTensor:
    """One tensor of a GGUF file: its name and type, and where its bytes are, as the `gguf` reader found them."""

    name: str
    type_name: str  # GGMLQuantizationType's name: "Q4_1", "F32", ...
    shape: tuple[int, ...]  # in the file's order, the fastest-varying dimension first
    data_dtype: str  # how the reader views the bytes: its dtype and shape (rows of blocks when quantized)
    data_shape: tuple[int, ...]
    data_offset: int  # in the file
    n_bytes: int
    file: mmap.mmap = field(repr=False, compare=False)

    @property
    def data(self) -> np.ndarray:
        return np.ndarray(self.data_shape, np.dtype(self.data_dtype), buffer=self.file, offset=self.data_offset)


@dataclass(frozen=True)
class WeightsFile:
    """A GGUF file's tensors, memory-mapped, without the reader's metadata."""

    tensors: list[FileTensor]
    file: mmap.mmap = field(repr=False)


def weights_reader(path: Path) -> WeightsFile:
    """The file's tensor table, memory-mapped. Read from the file's header by `tensor_table`: the `gguf`
    package's reader parses every metadata value first, the vocabulary's strings one small numpy view at a
    time (seconds for a 49k-token vocabulary, on every load)."""
    with path.open("rb") as f:
        try:
            file = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # an empty file
            raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None
    try:
        rows = tensor_table(file)
    except Exception as e:  # whatever a damaged header makes the parse raise (struct, Unicode, recursion, ...)
        file.close()
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None
    return WeightsFile([FileTensor(*row, file) for row in rows], file)


# GGUF metadata value types: fixed-size ones by struct format, and the two of variable size
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_ALIGNMENT = 32  # where `general.alignment` does not say otherwise
# tensor types whose bytes are viewed as elements (the others as rows of blocks, in bytes)
_ELEMENT_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "|i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


class _Header:
    """Reads a GGUF header in place (version 2 and 3: 64-bit counts and lengths)."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.at = buf, 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        self.at += n
        if self.at > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        return self.buf[self.at - n : self.at].decode("utf-8")

    def value(self, kind: int) -> Any:
        """One metadata value; arrays are skipped (None), as nothing the tensor table needs is one."""
        if kind in _GGUF_SCALARS:
            return self.take(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return self.string()
        if kind != _GGUF_ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = self.take("<I"), self.take("<Q")
        if item in _GGUF_SCALARS:
            self.at += count * struct.calcsize(_GGUF_SCALARS[item])
        else:
            for _ in range(count):
                self.value(item)
        return None


def tensor_table(buf: mmap.mmap) -> list[tuple[str, str, tuple[int, ...], str, tuple[int, ...], int, int]]:
    """Each tensor of a GGUF file as FileTensor's fields (name, type, shape in the file's order, the dtype and
    shape its bytes are viewed as, where they start in the file, their size), as the `gguf` reader finds them."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    head = _Header(buf)
    if head.take("<I") != 0x46554747:  # b"GGUF", little-endian
        raise ValueError("no GGUF magic number")
    if head.take("<I") not in (2, 3):
        raise ValueError("only GGUF versions 2 and 3 are read")
    n_tensors, n_fields = head.take("<Q"), head.take("<Q")
    alignment = _GGUF_ALIGNMENT
    keys: set[str] = set()
    for _ in range(n_fields):
        key = head.string()
        if key in keys:
            raise ValueError(f"metadata key {key} appears twice")
        keys.add(key)
        value = head.value(head.take("<I"))
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise ValueError(f"general.alignment must be a power of two, not {value!r}")
            alignment = value
    infos = []
    for _ in range(n_tensors):
        name = head.string()
        dims = tuple(head.take("<Q") for _ in range(head.take("<I")))
        infos.append((name, GGMLQuantizationType(head.take("<I")), dims, head.take("<Q")))
    if len({info[0] for info in infos}) != len(infos):
        raise ValueError("a tensor name appears twice")
    data_start = -(-head.at // alignment) * alignment
    rows = []
    for name, kind, dims, offset in infos:
        block, block_bytes = GGML_QUANT_SIZES[kind]
        if not dims or dims[0] % block:
            raise ValueError(f"tensor {name}'s rows of {dims[:1]} are not whole blocks of {block}")
        n_bytes = math.prod(dims) * block_bytes // block  # Python's integers: no overflow
        shape = tuple(reversed(dims))  # numpy's order: the fastest-varying dimension last
        dtype = _ELEMENT_DTYPES.get(kind.name)
        if dtype is None:
            dtype, shape = "|u1", (*shape[:-1], shape[-1] // block * block_bytes)
        if data_start + offset + n_bytes > len(buf):
            raise ValueError(f"tensor {name} runs past the end of the file")
        rows.append((name, kind.name, dims, dtype, shape, data_start + offset, n_bytes))
    return rows


def release(reader: WeightsFile, tensor: FileTensor) -> None:
    """Let the kernel drop the file pages of a tensor already copied out. Mapped pages that were read
    count as resident until unmapped: without this, loading would end holding the whole file besides
    the model (1 GB more for a 1.7B Q4 file)."""
    start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    end = tensor.data_offset + tensor.n_bytes
    with contextlib.suppress(OSError, ValueError):  # advice only: a kernel that refuses it changes nothing
        reader.file.madvise(mmap.MADV_DONTNEED, start, end - start)


def hf_name(gguf_name: str, architecture: str = "LlamaForCausalLM") -> str:
    """The Hugging Face name of a file's tensor, for a model of `architecture` (ModelConfig's)."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    names = {**_LAYER_NAMES, **family(architecture).gguf_tensor_names}
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{suffix}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    raise ModelLoadError(f"unexpected tensor {gguf_name!r} in GGUF file")


def unpermute_rows(rows: int, cfg: ModelConfig, name: str) -> np.ndarray | None:
    """The row order that undoes llama.cpp's Q/K permutation (None for other tensors, and for families whose
    files llama.cpp did not permute: it permutes only `llama`'s, whose Hugging Face checkpoints rotate halves)."""
    if not family(cfg.architecture).gguf_qk_interleaved:
        return None
    if name.endswith("q_proj.weight"):
        heads = cfg.num_heads
    elif name.endswith("k_proj.weight"):
        heads = cfg.num_kv_heads
    else:
        return None
    index = np.arange(rows)
    return index.reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows)


def tensor_type(tensor: FileTensor) -> str:
    return tensor.type_name


def dense_tensors(
    reader: WeightsFile, cfg: ModelConfig, skip: set[str] | None = None, matrix_dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every tensor of the file but those named in `skip`: matrices in
    `matrix_dtype` (what the loader stages them in), vectors (norms) in float32.

    A matrix is dequantized a slice of rows at a time into its final dtype, so that a large one (the
    embedding table) never exists in float32 whole.
    """
    for t in reader.tensors:
        if t.name in ROPE_FACTOR_TENSORS:
            continue
        name = hf_name(t.name, cfg.architecture)
        if skip and name in skip:
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        dtype = matrix_dtype if len(shape) == 2 else torch.float32
        tensor = _dequantized(t, shape, dtype)
        release(reader, t)
        if name.endswith("norm.weight"):
            # llama.cpp's converter stores the scales the model multiplies by; back to the checkpoint's w
            # (the model adds its family's offset at load, whatever the source)
            tensor -= family(cfg.architecture).norm_offset
        order = unpermute_rows(shape[0], cfg, name)
        yield name, tensor if order is None else tensor[torch.from_numpy(order)]


def _dequantized(t: FileTensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    raw = np.asarray(t.data)
    rows = shape[0] if len(shape) == 2 else 1
    raw = raw.reshape(rows, -1)
    out = torch.empty((rows, int(np.prod(shape)) // rows), dtype=dtype)
    for start in range(0, rows, DEQUANTIZE_ROWS):
        try:
            part = dequantize_rows(raw[start : start + DEQUANTIZE_ROWS], tensor_type(t))
        except ValueError as e:
            raise ModelLoadError(f"{t.name}: {e}") from None
        out[start : start + len(part)] = torch.from_numpy(np.array(part, copy=not part.flags.writeable))
    return out.view(shape)


def projection_blocks(reader: WeightsFile, cfg: ModelConfig, names: set[str], fmt: str) -> Iterator[tuple[str, Blocks]]:
    """(Hugging Face name, blocks) of the named 2-D tensors, rows in Hugging Face's order.

    A type whose levels fit the bits of `fmt` (a rounding of `blocks.ROUNDINGS`) is read exactly,
    its own levels and scales; any other is dequantized and rounded in `fmt`, as llama.cpp's `quantize`
    would.
    """
    for t in reader.tensors:
        if t.name in ROPE_FACTOR_TENSORS:
            continue
        name = hf_name(t.name, cfg.architecture)
        if name not in names:
            continue
        qtype, rows = tensor_type(t), int(t.shape[-1])
        raw = np.asarray(t.data).reshape(rows, -1)
        try:
            if EXACT_BITS.get(qtype, 99) <= ROUNDING_BITS[fmt]:
                blocks = gguf_blocks(raw, qtype)
            else:
                blocks = _rounded(raw, qtype, fmt)
        except ValueError as e:
            raise ModelLoadError(f"{t.name}: {e}") from None
        release(reader, t)
        order = unpermute_rows(blocks[0].shape[0], cfg, name)
        yield name, blocks if order is None else tuple(b[torch.from_numpy(order)] for b in blocks)  # type: ignore[misc]


def _rounded(raw: np.ndarray, qtype: str, fmt: str) -> Blocks:
    """Raw rows of any readable type dequantized and rounded in `fmt`, a slice of rows at a time."""
    parts = []
    for start in range(0, len(raw), DEQUANTIZE_ROWS):
        values = dequantize_rows(np.array(raw[start : start + DEQUANTIZE_ROWS]), qtype)
        parts.append(round_blocks(torch.from_numpy(values), fmt))
    levels, d, m = (torch.cat(t) for t in zip(*parts, strict=True))
    return levels, d, m
