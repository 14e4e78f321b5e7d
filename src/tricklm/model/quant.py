"""Half-precision weights for CPU serving: fbgemm's packed fp16 kernel for decode, bfloat16 for prefill.

A decode step reads every weight once and does little arithmetic, so its time follows the weights'
size and how well the kernel streams them. On a 2-core Zen 4 (`python benchmarks/linear_kernels.py`)
fbgemm's packed fp16 GEMM, with float32 activations, ran all SmolLM2-135M projections of a 1-row step
in 8.6 ms, against 17 ms for oneDNN bfloat16 and 36 ms for float32. torch's int8 weight-only kernel
matched it at 1 row but fell behind from 4 rows on (34 against 21 ms at 16), its int4 kernel was far
slower, and int8 with dynamically quantised activations (fbgemm) was fastest but broke greedy answers.
Steps with many rows are bound by arithmetic instead, where the bfloat16 GEMM wins, so each projection
keeps a bfloat16 copy for those and picks per call. The copies cost about 210 MB for the default model;
`--quantization fp16-only` drops them and runs every step on the packed kernel, whose prefill is slower.

fp16 holds the default model's 4-bit-at-source weights almost exactly, and activations stay float32,
so greedy output matches the float32 reference far more often than a bfloat16 model does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tricklm.memory import release_freed_memory

ACT_DTYPE = torch.float32
# Half the bytes of float32 with three more mantissa bits than bfloat16; K/V values sit far inside
# its range. Attention upcasts the gathered context to float32.
KV_DTYPE = torch.float16
DENSE_DTYPE = torch.bfloat16
# Up to this many rows the packed fp16 kernel wins; above it the bfloat16 copy does (same benchmark).
MAX_PACKED_ROWS = 16
# "fp16": packed fp16 plus bfloat16 copies for large steps; "fp16-only": packed fp16 for every step.
FP16_MODES = ("fp16", "fp16-only")


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


class HalfLinear(nn.Module):
    """A projection kept as packed fp16 (few rows) plus, optionally, a bfloat16 copy (many rows).

    Without the copy (`dense=False`) every step reads the packed weights: less memory, slower prefill.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool = True, dense: bool = True
    ) -> None:
        super().__init__()
        w = weight.detach()
        b = None if bias is None else bias.detach().float()
        pack = packed and fbgemm_available()
        self.packed = torch.ops.quantized.linear_prepack_fp16(w.float(), b) if pack else None
        # Plain attributes, not buffers, so a later `model.to(dtype)` cannot widen them; a bfloat16
        # weight is kept as is (the tied head shares the embedding table).
        keep_dense = dense or self.packed is None
        self.weight_dense = w.to(DENSE_DTYPE) if keep_dense else None
        self.bias_dense = None if b is None or not keep_dense else b.to(DENSE_DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.weight_dense is None or (self.packed is not None and rows <= MAX_PACKED_ROWS):
            return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)  # type: ignore[no-any-return]
        return F.linear(x.to(DENSE_DTYPE), self.weight_dense, self.bias_dense).to(x.dtype)


class HalfEmbedding(nn.Module):
    """A bfloat16 lookup table that hands out float32 rows: half the memory, same activations."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight.detach().to(DENSE_DTYPE)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(ACT_DTYPE)


def quantize_fp16(model: nn.Module, dense: bool = True) -> nn.Module:
    """Swap every Linear for a HalfLinear and every Embedding for a HalfEmbedding, in place.

    Expects a float32 model: what is left (norms, RoPE tables) stays float32, like the activations.
    A tied output head becomes a HalfLinear over the embedding table. `dense=False` skips the
    projections' bfloat16 copies (a tied head keeps its: it is the embedding table, so it costs nothing).
    """
    tied = not isinstance(getattr(model, "lm_head", None), nn.Linear)
    # Slots, not modules: holding no reference to the old children lets each float16 staging weight be
    # freed as soon as it is replaced, so loading peaks near the final size rather than staging + final.
    slots = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Embedding) or (isinstance(child, nn.Linear) and name != "lm_head")
    ]
    for parent, name in slots:
        setattr(parent, name, _half(getattr(parent, name), dense))
        release_freed_memory()  # glibc keeps freed heap pages resident until asked
    head = model.get_input_embeddings() if tied else model.lm_head  # type: ignore[operator]
    assert isinstance(head, HalfEmbedding | nn.Linear)
    # Packed too: at one row the fp16 head took 3 ms off a 23 ms step. Its dense copy is the embedding
    # table itself when they are tied, so that costs nothing.
    model.lm_head = HalfLinear(head.weight, None, dense=dense or tied)
    return model


def _half(module: nn.Module, dense: bool) -> nn.Module:
    if isinstance(module, nn.Embedding):
        return HalfEmbedding(module.weight)
    assert isinstance(module, nn.Linear)
    return HalfLinear(module.weight, module.bias, dense=dense)


def model_dtypes(model: nn.Module) -> tuple[torch.dtype, torch.dtype]:
    """(activation dtype, KV cache dtype) of a loaded model."""
    if any(isinstance(m, HalfLinear) for m in model.modules()):
        return ACT_DTYPE, KV_DTYPE
    dtype = next(iter(model.parameters())).dtype
    return dtype, dtype
