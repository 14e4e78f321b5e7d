"""Weight-only int8 quantisation (symmetric, per output channel) for memory-bound CPU decoding.

A decode step with few rows reads every weight once and does little arithmetic, so its time follows
the weights' size: int8 is a quarter of fp32. Steps with many rows (prefill, big batches) are bound by
arithmetic instead, where the bfloat16 GEMM is several times faster than the int8 kernel; each layer
keeps a bfloat16 copy for those and picks per call. Activations run in bfloat16 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACT_DTYPE = torch.bfloat16
# At or below this many rows the int8 kernel wins (measured on a 2-core Zen 4; see benchmarks/README.md).
MAX_INT8_ROWS = 8


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.weight_int8: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(ACT_DTYPE))
        self.weight_dense: torch.Tensor
        self.register_buffer("weight_dense", weight.detach().to(ACT_DTYPE))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(ACT_DTYPE), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if rows.shape[0] > MAX_INT8_ROWS:
            return F.linear(x, self.weight_dense, self.bias)
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], -1)  # type: ignore[no-any-return]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap the MLP projections for Int8Linear; everything else moves to bfloat16.

    The MLP holds three quarters of a layer's weights. Attention projections and the output head are
    kept in bfloat16: quantising them too flipped greedy answers of SmolLM2-135M (already 4-bit at the
    source), while int8 MLPs kept them as close to float32 as plain bfloat16 does.
    """
    for parent_name, parent in list(model.named_modules()):
        if not parent_name.endswith("mlp"):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child.weight, child.bias))
    return model.to(ACT_DTYPE)
