"""Weight-only int8 quantisation (symmetric, per output channel) for memory-bound CPU decoding.

Every step reads all weights from memory, so at small batch sizes the step time follows their size:
int8 is a quarter of fp32. Activations run in bfloat16, the input type for which the int8 kernel is fast.
"""

from __future__ import annotations

import torch
from torch import nn

ACT_DTYPE = torch.bfloat16


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.weight_int8: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(ACT_DTYPE))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(ACT_DTYPE), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight_int8, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], -1)  # type: ignore[no-any-return]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear (and a tied output head) for Int8Linear; the rest moves to bfloat16."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.weight, child.bias))
    if getattr(model, "lm_head", None) is None:
        # Tied head: the embedding table stays for look-ups; the projection gets its own int8 copy.
        model.lm_head = Int8Linear(model.get_input_embeddings().weight, None)  # type: ignore[operator]
    return model.to(ACT_DTYPE)
