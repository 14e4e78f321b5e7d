"""Compact weights for CPU serving: the modes of `--quantization` and the torch-kernel ones among them.

The block modes ("gguf", the default for a GGUF file, and "q4_0", "q4_1", "q4_k", "q8_0") keep one copy
of every projection in blocks of 32 read by every step through int8 kernels (`qlinear.py`,
`blocks.py`, `../native/qkernels.h`). The rest of this module is about the older modes, which use
torch's own kernels: 4-bit or packed fp16 for decode steps and a second copy for prefill.

A decode step reads every weight once and does little arithmetic, so its time follows the weights'
size and how well the kernel streams them. At one row (`python benchmarks/linear_kernels.py`; the
figures per CPU are in `benchmarks/README.md`) fbgemm's packed fp16 GEMM, with float32 activations, ran
the SmolLM2-135M projections faster than oneDNN bfloat16, and both beat float32. torch's 4-bit kernel
(groups of 32, bfloat16 activations) was faster still at 1 row and on par at 16, and reads a quarter of
fp16's bytes; fed float32 activations it is many times slower. torch's int8 weight-only kernel fell
behind from 4 rows on, and int8 with dynamically quantised activations (fbgemm) broke greedy answers.

Steps with many rows (prefill) are bound by arithmetic instead, and which kernel wins there depends on
the CPU: oneDNN's bfloat16 GEMM on one, fbgemm's fp16 GEMM (float32 activations) on another (an AMD
EPYC and an Intel Xeon without AMX, in `benchmarks/README.md`). So each projection keeps a second copy
for those steps, in whichever format `large_step_format` measures faster at load (or as
`--prefill-weights` says); packed fp16 decode weights are their own fp16 copy.

4-bit is only used where the weights already are: a projection whose every group of 32 weights spans
16 evenly spaced levels from its smallest to its largest (a Q4_1 GGUF's, like the default model's)
keeps exactly those levels; scales, and the kernel's inputs and outputs, are bfloat16, so the error is
bfloat16's rather than 4-bit rounding's. Any other projection keeps fp16. Activations stay
float32 between projections, so greedy output matches the float32 reference far more often than a
bfloat16 model does (`tests/model/test_quant.py`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tricklm.memory import release_freed_memory
from tricklm.model.base import CausalLM
from tricklm.model.weights.blocks import BLOCK
from tricklm.model.weights.modes import PREFILL_FORMATS, WeightFormat, check_quantization
from tricklm.model.weights.qlinear import QEmbedding, QLinear, quantize_blocks

log = logging.getLogger(__name__)

ACT_DTYPE = torch.float32
# Half the bytes of float32 with three more mantissa bits than bfloat16; K/V values sit far inside
# its range. Attention upcasts the gathered context to float32.
KV_DTYPE = torch.float16
DENSE_DTYPE = torch.bfloat16
# Up to this many rows the packed kernels win; above it the bfloat16 copy does (same benchmark).
MAX_PACKED_ROWS = 16
# How block modes round the token table and output head: 8 bits whatever the mode, as llama.cpp keeps
# the output at 6 bits or more (the logits are what every token is sampled from)
TABLE_ROUNDING = "q8_0"
INT4_GROUP = 32  # weights per scale, as in GGUF's Q4_0 / Q4_1 blocks
# A group counts as 4-bit when its stored 16-level form is this close (relative to the group's largest
# weight): one bfloat16 ulp, what a bfloat16 copy of the weights could be off by; a real 4-bit rounding
# is off by about 2^-4.
INT4_TOLERANCE = 2.0**-7
INT4_CHECK_ROWS = 1024
# The step `large_step_format` times: a prefill chunk through an MLP-sized projection, best of a few.
CALIBRATION_ROWS, CALIBRATION_SHAPE, CALIBRATION_REPEATS = 256, (1536, 576), 7
FBGEMM_K_BLOCK = 512  # fbgemm pads a packed fp16 weight's inputs to a multiple of this


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


@functools.cache
def large_step_format() -> str:
    """The copy prefill steps should read here: "fp16" if fbgemm's packed fp16 GEMM runs a prefill-sized
    step faster than oneDNN's bfloat16 on this CPU, else "bf16"; measured once per process.

    On one thread, alternating the two: the ratio is the same as on all cores (`benchmarks/README.md`), while
    a core taken by another process stalls a multi-threaded GEMM, fbgemm's more than oneDNN's: timed on
    two threads while the test suite ran, bfloat16 looked fastest.
    """
    if not fbgemm_available():
        return "bf16"
    gen = torch.Generator().manual_seed(0)  # its own: loading a model must not reseed the caller's
    w = torch.randn(*CALIBRATION_SHAPE, generator=gen)
    x = torch.randn(CALIBRATION_ROWS, CALIBRATION_SHAPE[1], generator=gen)
    wb, xb, copy = w.to(DENSE_DTYPE), x.to(DENSE_DTYPE), Fp16Weight(w, None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bf16, fp16 = _best_seconds([lambda: F.linear(xb, wb), lambda: copy.matmul(x)])
    finally:
        torch.set_num_threads(threads)
    choice = "fp16" if fp16 < bf16 else "bf16"
    log.info(
        "prefill weights: %s (a %d-row step on one thread: bf16 %.1f ms, fp16 %.1f ms; --prefill-weights to pin)",
        choice,
        CALIBRATION_ROWS,
        1000 * bf16,
        1000 * fp16,
    )
    return choice


def _best_seconds(ops: list[Callable[[], object]]) -> list[float]:
    """Each op's best time over CALIBRATION_REPEATS rounds, the ops taking turns within a round."""
    for op in ops:
        op()  # warm-up: packing, primitive caches
    best = [float("inf")] * len(ops)
    for _ in range(CALIBRATION_REPEATS):
        for i, op in enumerate(ops):
            start = time.perf_counter()
            op()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


class Int4Weight:
    """A weight in torch's CPU 4-bit layout: packed levels plus a (scale, zero) pair per group of 32."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed = packed
        self.scales_and_zeros = scales_and_zeros
        self.bias = bias

    @classmethod
    def from_exact(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int4Weight | None:
        """The same weight in 4 bits if every group of 32 is already 16 evenly spaced levels from its
        smallest to its largest weight (as Q4_1 quantizes), else None."""
        if weight.shape[1] % INT4_GROUP:
            return None
        levels, pairs = [], []
        # A slice of rows at a time: a weight that is not 4-bit (a large output head, say) is turned
        # down after one slice, and the float32 work buffers stay a few MB instead of 4x the weight.
        for rows in weight.split(INT4_CHECK_ROWS):
            found = _exact_levels(rows)
            if found is None:
                return None
            levels.append(found[0])
            pairs.append(found[1])
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.cat(levels), 1)
        except RuntimeError:  # a shape the kernel does not take
            return None
        return cls(packed, torch.cat(pairs, dim=1), bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32 -> [..., N] float32; the kernel is only fast with bfloat16 activations."""
        flat = x.reshape(-1, x.shape[-1]).to(DENSE_DTYPE, memory_format=torch.contiguous_format)
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, INT4_GROUP, self.scales_and_zeros
        ).to(x.dtype)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], -1)


def _exact_levels(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(levels [r, K] int32, (scale, zero) pairs [K/32, r, 2]) if the rows are exactly 4-bit, else None."""
    r, k = rows.shape
    groups = rows.float().view(r, k // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low) / 15
    levels = ((groups - low) / step.clamp_min(torch.finfo(torch.float32).tiny)).round_().clamp_(0, 15)
    # Two tests: the weights sit on their levels (within a quarter step: not merely close in absolute
    # terms, as a narrow group far from zero would be), and what is stored, scales and zeros rounded
    # to bfloat16, is as close as the tolerance. `<=` turns NaN down too.
    on_levels = (levels * step + low - groups).abs_() <= step / 4
    pairs = torch.cat((step, low + 8 * step), dim=-1).to(DENSE_DTYPE)  # the kernel: (level - 8) * scale + zero
    stored = (levels - 8) * pairs[..., :1].float() + pairs[..., 1:].float()
    close = (stored - groups).abs_() <= INT4_TOLERANCE * groups.abs().amax(-1, keepdim=True)
    if not bool((on_levels & close).all()):
        return None
    return levels.view(r, k).to(torch.int32), pairs.transpose(0, 1).contiguous()


class Fp16Weight:
    """A prefill copy in fbgemm's packed fp16, without fbgemm's padding.

    fbgemm pads a packed weight's inputs to a multiple of 512: SmolLM2's 576 take the room of 1024, nearly
    doubling the copies. So the first multiple of 512 inputs are packed and the few left over kept in
    float32, for one small extra GEMM per call (its memory and time: `benchmarks/README.md`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        k = weight.shape[1]
        self.split = k // FBGEMM_K_BLOCK * FBGEMM_K_BLOCK or k  # fewer inputs than a block: pack them all
        w = weight.float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(w[:, : self.split].contiguous(), bias)
        self.rest = w[:, self.split :].contiguous() if self.split < k else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32 -> [..., N] float32."""
        flat = x.reshape(-1, x.shape[-1])
        y: torch.Tensor = torch.ops.quantized.linear_dynamic_fp16(flat[:, : self.split].contiguous(), self.packed)
        if self.rest is not None:
            y.addmm_(flat[:, self.split :], self.rest.t())
        return y.view(*x.shape[:-1], -1)


class HalfLinear(nn.Module):
    """A projection kept as 4-bit or packed fp16 (few rows) plus, optionally, a copy for many rows.

    4-bit (`int4=True`) only when the weight already is (see `Int4Weight.from_exact`); otherwise packed
    fp16. The copy for large steps (`dense=True`) is bfloat16 or packed fp16, as `prefill` says ("bf16",
    "fp16"); packed fp16 decode weights are their own fp16 copy. Without a copy (`dense=False`) every
    step reads the decode weights: less memory, slower prefill.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        packed: bool = True,
        dense: bool = True,
        int4: bool = False,
        prefill: str = "bf16",
    ) -> None:
        super().__init__()
        if prefill not in PREFILL_FORMATS[1:]:
            raise ValueError(f"prefill format must be one of {', '.join(PREFILL_FORMATS[1:])}")
        w = weight.detach()
        self.shape = (int(w.shape[0]), int(w.shape[1]))  # (outputs, inputs): the packed forms do not say
        b = None if bias is None else bias.detach().float()
        self.int4 = Int4Weight.from_exact(w, b) if packed and int4 else None
        pack = packed and self.int4 is None and fbgemm_available()
        self.packed = torch.ops.quantized.linear_prepack_fp16(w.float(), b) if pack else None
        # A bfloat16 weight is its own bfloat16 copy (the tied head's is the embedding table): free,
        # so it never gets another.
        free_dense = w.dtype == DENSE_DTYPE
        fp16_copy = dense and prefill == "fp16" and fbgemm_available() and not free_dense
        self.prefill_copy = Fp16Weight(w, b) if fp16_copy and self.packed is None else None
        # Plain attributes, not buffers, so a later `model.to(dtype)` cannot widen them.
        keep_dense = (dense and not fp16_copy) or (
            self.packed is None and self.int4 is None and self.prefill_copy is None
        )
        self.weight_dense = w.to(DENSE_DTYPE) if keep_dense else None
        self.bias_dense = None if b is None or not keep_dense else b.to(DENSE_DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At most one copy is kept; a large step reads it, and otherwise the decode weights
        if x.numel() // x.shape[-1] > MAX_PACKED_ROWS:
            if self.prefill_copy is not None:
                return self.prefill_copy.matmul(x)
            if self.weight_dense is not None:
                return self._dense(x)
        if self.int4 is not None:
            return self.int4.matmul(x)
        if self.packed is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)  # type: ignore[no-any-return]
        if self.prefill_copy is not None:  # packed=False: the copy is all there is
            return self.prefill_copy.matmul(x)
        return self._dense(x)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        assert self.weight_dense is not None  # kept whenever no packed form is
        return F.linear(x.to(DENSE_DTYPE), self.weight_dense, self.bias_dense).to(x.dtype)


class HalfEmbedding(nn.Module):
    """A bfloat16 lookup table that hands out float32 rows: half the memory, same activations."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight.detach().to(DENSE_DTYPE)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(ACT_DTYPE)


def quantize(model: CausalLM, mode: WeightFormat | str = WeightFormat.INT4, prefill: str = "auto") -> CausalLM:
    """Swap every Linear for a HalfLinear and every Embedding for a HalfEmbedding, in place.

    Expects a float32 model: what is left (norms, RoPE tables) stays float32, like the activations.
    A tied output head becomes a HalfLinear over the embedding table. `prefill` is the format of the
    projections' copies for large steps ("auto": `large_step_format`); the formats without one keep none
    (a tied head keeps its bfloat16 one: it is the embedding table, so it costs nothing).
    """
    if isinstance(mode, str):
        check_quantization(mode)
    fmt = WeightFormat(mode)
    if not fmt.compact:
        raise ValueError(f"{fmt.value} keeps the model as it is: nothing to quantize")
    if prefill not in PREFILL_FORMATS:
        raise ValueError(f"prefill weights must be one of {', '.join(PREFILL_FORMATS)}")
    dense = fmt.prefill_copy
    if prefill == "auto":
        prefill = large_step_format() if dense else "bf16"
    tied = model.lm_head is None
    # Slots, not modules: holding no reference to the old children lets each float16 staging weight be
    # freed as soon as it is replaced, so loading peaks near the final size rather than staging + final.
    slots = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Embedding) or (isinstance(child, nn.Linear) and name != "lm_head")
    ]
    for parent, name in slots:
        setattr(parent, name, _half(getattr(parent, name), fmt, prefill))
        release_freed_memory()  # glibc keeps freed heap pages resident until asked
    head = model.get_input_embeddings() if tied else model.lm_head
    if isinstance(head, QEmbedding):  # one copy of the table in blocks serves the head too
        model.lm_head = QLinear(head.qweight, None, precise=True)
        return model
    if isinstance(head, QLinear):  # built from a GGUF file's blocks already
        head.precise = True
        return model
    if fmt.rounds and isinstance(head, nn.Linear) and head.in_features % BLOCK == 0:
        model.lm_head = QLinear(quantize_blocks(head.weight.detach(), TABLE_ROUNDING), head.bias, precise=True)
        return model
    assert isinstance(head, HalfEmbedding | nn.Linear)
    # Packed too: at one row the packed fp16 head makes a decode step faster (benchmarks/README.md). Its
    # dense copy is the embedding table itself when they are tied, so that costs nothing. Block modes keep
    # one copy: a tied head reads the bfloat16 table alone (more memory for the packed copy than its speed
    # is worth at real sizes).
    packed = not (fmt.blocks and tied)
    int4 = fmt is WeightFormat.INT4
    model.lm_head = HalfLinear(head.weight, None, packed=packed, dense=dense or tied, int4=int4, prefill=prefill)
    return model


def _half(module: nn.Module, fmt: WeightFormat, prefill: str) -> nn.Module:
    if isinstance(module, nn.Embedding):
        if fmt.rounds and module.embedding_dim % BLOCK == 0:
            return QEmbedding(quantize_blocks(module.weight.detach(), TABLE_ROUNDING))
        return HalfEmbedding(module.weight)
    assert isinstance(module, nn.Linear)
    if fmt.rounds and module.in_features % BLOCK == 0:
        return QLinear(quantize_blocks(module.weight.detach(), fmt.rounding), module.bias)
    int4 = fmt is WeightFormat.INT4
    return HalfLinear(module.weight, module.bias, dense=fmt.prefill_copy, int4=int4, prefill=prefill)


def model_dtypes(model: nn.Module) -> tuple[torch.dtype, torch.dtype]:
    """(activation dtype, KV cache dtype) of a loaded model."""
    if any(isinstance(m, HalfLinear | QLinear) for m in model.modules()):
        return ACT_DTYPE, KV_DTYPE
    dtype = next(iter(model.parameters())).dtype
    return dtype, dtype


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights held, by format ("4-bit blocks", "int4", "fp16 packed", "bfloat16", ...).

    fbgemm's packed fp16 weights are opaque: they count as 2 bytes a weight, what they hold (the
    padding of their inputs to a multiple of 512 aside). A head that reads the embedding table counts once.
    """
    held: dict[str, int] = {}
    seen: set[int] = set()

    def add(kind: str, *tensors: torch.Tensor | None) -> None:
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                held[kind] = held.get(kind, 0) + t.numel() * t.element_size()

    for module in model.modules():
        if isinstance(module, QLinear | QEmbedding):
            w = module.qweight
            add(f"{w.bits}-bit blocks", w.levels, w.d, w.m, getattr(module, "bias", None))
        elif isinstance(module, HalfLinear):
            out, inputs = module.shape
            if module.int4 is not None:
                add("int4", module.int4.packed, module.int4.scales_and_zeros, module.int4.bias)
            if module.packed is not None:
                held["fp16 packed"] = held.get("fp16 packed", 0) + 2 * out * inputs
            if module.prefill_copy is not None:
                held["fp16 packed"] = held.get("fp16 packed", 0) + 2 * out * module.prefill_copy.split
                add("float32", module.prefill_copy.rest)
            add("bfloat16", module.weight_dense, module.bias_dense)
        elif isinstance(module, HalfEmbedding):
            add("bfloat16", module.weight)
        for tensor in module.parameters(recurse=False):  # norms, and everything of a model kept as it is
            add(str(tensor.dtype).removeprefix("torch."), tensor)
    return {kind: n for kind, n in held.items() if n}
