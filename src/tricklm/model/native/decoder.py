"""Decode steps of Llama-family models (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3) with compact projections in
C++ (`decode.cpp`), with the Python path as fallback.

At one row, a decode step of the Python path spent more time dispatching its ~45 small torch ops per
layer than in the 4-bit projections. The extension runs the same step without the interpreter, and
fuses everything between the projections into plain loops (`benchmarks/README.md` has the figures).

It is compiled on first use by torch's extension builder (a C++ compiler and ninja; the time it takes is
in `benchmarks/README.md`) into the tricklm cache, and loaded from there afterwards; `make install`
builds it ahead of time. Where it cannot be built, or `TRICKLM_NATIVE=0`, or the model is not one it
runs, steps take the Python path, with the same results.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from tricklm.model.attention import KVCacheLayer
from tricklm.model.base import CausalLM
from tricklm.model.gemma import GemmaDecoderLayer
from tricklm.model.layers import RMSNorm
from tricklm.model.llama import LlamaDecoderLayer, LlamaForCausalLM
from tricklm.model.native.build import DISABLE_ENV as DISABLE_ENV
from tricklm.model.native.build import enabled_by_env, load_or_warn
from tricklm.model.weights.qlinear import QLinear
from tricklm.model.weights.quant import KV_DTYPE, HalfLinear, Int4Weight

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.cpp")
EXTENSION_NAME = "tricklm_decode"


@functools.cache
def load_extension() -> Any | None:
    """The compiled decode step (built into the cache on first use), or None if it cannot be built."""
    return load_or_warn(EXTENSION_NAME, SOURCE, "native decode steps unavailable, decode runs in Python")


# qkv, o, gate_up, down: all in torch's 4-bit layout (int4) or all one-copy blocks (gguf, q4_1, q8_0, ...)
Projections = tuple[Int4Weight, Int4Weight, Int4Weight, Int4Weight] | tuple[QLinear, QLinear, QLinear, QLinear]


def _int4(module: Any) -> Int4Weight | None:
    """The projection's 4-bit weights, if it kept any (see `Int4Weight.from_exact`)."""
    return module.int4 if isinstance(module, HalfLinear) else None


def _projections(layer: Any) -> Projections | None:
    """A decoder layer's compact projections, if all four are of one layout and only qkv has a bias."""
    attn, mlp = layer.self_attn, layer.mlp
    modules = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    if all(isinstance(m, QLinear) for m in modules):
        found: Projections = modules
    else:
        qkv, o, gate_up, down = (_int4(p) for p in modules)
        if qkv is None or o is None or gate_up is None or down is None:
            return None
        found = (qkv, o, gate_up, down)
    if any(p.bias is not None for p in found[1:]):
        return None
    return found


def _layer_norms(layer: Any) -> dict[str, Any]:
    """The layer's norms by the stack's names for their places, or {} for a layer class it does not know."""
    attn = layer.self_attn
    heads = {"q": attn.q_norm, "k": attn.k_norm} if attn.q_norm is not None or attn.k_norm is not None else {}
    if type(layer) is LlamaDecoderLayer:
        return {"input": layer.input_layernorm, "mlp": layer.post_attention_layernorm, **heads}
    if type(layer) is GemmaDecoderLayer:
        return {
            "input": layer.input_layernorm,
            "attn_out": layer.post_attention_layernorm,
            "mlp": layer.pre_feedforward_layernorm,
            "mlp_out": layer.post_feedforward_layernorm,
            **heads,
        }
    return {}


def _norm_weights(layer: Any) -> dict[str, torch.Tensor] | None:
    """The layer's RMSNorm scales, if all are float32 (the extension reads them as such) and every norm is
    exactly `RMSNorm` (a subclass may compute something else)."""
    norms = _layer_norms(layer)
    if not norms or not all(type(n) is RMSNorm and n.weight.dtype == torch.float32 for n in norms.values()):
        return None
    return {name: norm.weight.detach() for name, norm in norms.items()}


# What the C++ stack implements, per layer: RMSNorm -> fused qkv (a bias allowed) -> an RMSNorm on each q and
# k head where the config asks for it (Qwen3, Gemma 3) -> half-rotation RoPE over the head's leading
# rotary_dim, from the global table or (Gemma 3's sliding layers) a local one -> GQA attention with the
# config's query scale and soft cap, over the whole context or the layer's window -> o_proj -> an RMSNorm
# on the output where the layer has one (Gemma) -> residual; RMSNorm -> SiLU- or tanh-GELU-gated MLP ->
# the same optional norm -> residual. The embedding (and Gemma's scaling of it) and the logits stay in
# Python. A class whose family spec says `native_step` runs nothing else, as long as its config asks for
# nothing else; only a class that declares that spec itself counts (a subclass may add an operation).
# config.hidden_act -> the stack's gate activation
GATES = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def missing_operations(model: torch.nn.Module) -> list[str]:
    """What `model` computes that the C++ stack does not (empty: the stack can run it)."""
    spec = type(model).__dict__.get("family")
    missing = [] if spec is not None and spec.native_step else [f"the {type(model).__name__} class"]
    if not isinstance(model, CausalLM):
        return missing
    cfg = model.config
    checks = {
        f"the {cfg.hidden_act} activation": cfg.hidden_act not in GATES,
        "an odd number of rotated dimensions": cfg.rotary_dim % 2 != 0,
    }
    return missing + [name for name, lacks in checks.items() if lacks]


def supports(model: torch.nn.Module, kv_layers: list[KVCacheLayer]) -> bool:
    """True for a model with no operation the stack lacks, whose every decoder projection is compact (int4
    or blocks), with an fp16 KV cache."""
    missing = missing_operations(model)
    if missing:
        log.info("native model step not used: it does not implement %s", ", ".join(missing))
        return False
    assert isinstance(model, LlamaForCausalLM)
    if any(layer.kv.dtype != KV_DTYPE for layer in kv_layers):
        return False
    return all(_projections(layer) is not None and _norm_weights(layer) is not None for layer in model.model.layers)


class NativeDecoder:
    """A model's decoder stack in the extension: runs decode steps (a row per sequence) and, with one-copy
    blocks, prefill chunks too (a row per token)."""

    def __init__(self, model: LlamaForCausalLM, kv_layers: list[KVCacheLayer], block_size: int, ext: Any) -> None:
        cfg, body = model.config, model.model
        self.model, self.body = model, body
        # With one-copy blocks the stack runs any step: a prefill chunk is a row per token, each attending
        # over its own context (the cache holds the chunk's earlier tokens by then). Torch's 4-bit kernel
        # is for decode rows only (prefill reads a bfloat16 copy in Python).
        self.runs_any_step = False
        self.stack = ext.DecoderStack(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            rotary_dim=cfg.rotary_dim,
            intermediate_size=cfg.intermediate_size,
            eps=cfg.norm_eps,
            block_size=block_size,
            attention_scale=cfg.attention_scale,
            attn_softcap=cfg.attn_logit_softcapping or 0.0,
            gate=GATES[cfg.hidden_act],
            final_norm=body.norm.weight.detach(),
        )
        for i, (layer, cache) in enumerate(zip(body.layers, kv_layers, strict=True)):
            projections, norms = _projections(layer), _norm_weights(layer)
            assert projections is not None and norms is not None  # checked by `supports`
            qkv, o, gate_up, down = projections
            window = cfg.window(i) or -1
            local_rope = body.uses_local_rope[i]
            if isinstance(qkv, QLinear):
                self.runs_any_step = True
                parts = [[m.qweight.levels, m.qweight.d, m.qweight.m] for m in projections]  # type: ignore[union-attr]
                self.stack.add_layer_blocks(norms, cache.kv, window, local_rope, parts[0], qkv.bias, *parts[1:])
                continue
            self.stack.add_layer(
                norms,
                cache.kv,
                window,
                local_rope,
                qkv.packed,
                qkv.scales_and_zeros,
                qkv.bias,
                o.packed,
                o.scales_and_zeros,
                gate_up.packed,
                gate_up.scales_and_zeros,
                down.packed,
                down.scales_and_zeros,
            )

    @classmethod
    def build(cls, model: torch.nn.Module, kv_layers: list[KVCacheLayer], block_size: int) -> NativeDecoder | None:
        """The native decoder for this model, or None if it does not run it (or cannot be built here)."""
        if not enabled_by_env() or not supports(model, kv_layers):
            return None
        ext = load_extension()
        if ext is None:
            return None
        assert isinstance(model, LlamaForCausalLM)
        decoder = cls(model, kv_layers, block_size, ext)
        steps = "every step (prefill chunks as well)" if decoder.runs_any_step else "decode steps"
        log.info("native %s model step: %s run in C++", type(model).__name__, steps)
        return decoder

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, H] of B tokens: one new token per sequence, or (`runs_any_step`) any
        tokens, each attending causally over its context.

        block_tables [B, n]: each token's sequence's cache blocks (padded); context_lens [B]: its context
        length including itself, whose K/V go to `slots`.
        """
        x = self.model.embed(input_ids)
        (cos, sin), local = self.body.rotary_tables(positions, x.dtype)
        cos_local, sin_local = local if local is not None else (None, None)
        return self.stack.forward(  # type: ignore[no-any-return]
            x, cos, sin, slots, block_tables, context_lens, cos_local=cos_local, sin_local=sin_local
        )


def _build(name: str) -> bool:
    """Builds one extension into the cache (in a worker process); True if it can be loaded."""
    from tricklm.model.weights.qlinear import load_qmatmul

    return (load_extension() if name == "decode" else load_qmatmul()) is not None


def main() -> int:
    """`python -m tricklm.model.native`: build the extensions now (as `make install` does)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tricklm.model.weights.qlinear import load_qmatmul

    # Each extension is one translation unit that compiles on one core: the two at once take the time of one.
    # Worker processes, because torch's builder was not written to run twice at once in one process.
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_build, ["decode", "qmatmul"]))
    ext = load_extension()
    if ext is not None:
        log.info("native decode step ready: %s", ext.__file__)
    qmatmul = load_qmatmul()
    if qmatmul is not None:
        log.info("native block matmul ready (%s kernel): %s", qmatmul.isa(), qmatmul.__file__)
    return 0 if ext is not None and qmatmul is not None else 1
