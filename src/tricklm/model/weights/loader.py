"""Build a model from a local folder: config.json plus *.safetensors, or a link to a GGUF file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from tricklm.memory import release_freed_memory
from tricklm.model.base import CausalLM
from tricklm.model.config import ModelConfig, ModelLoadError
from tricklm.model.layers import RotaryEmbedding
from tricklm.model.registry import model_class
from tricklm.model.weights.blocks import BLOCK, FLOAT_TYPES, Blocks
from tricklm.model.weights.gguf_file import (
    GGUF_LINK,
    ROPE_FACTOR_TENSORS,
    FileTensor,
    WeightsFile,
    dense_tensors,
    hf_name,
    projection_blocks,
    tensor_type,
    weights_reader,
)
from tricklm.model.weights.modes import WeightFormat, weight_format
from tricklm.model.weights.qlinear import QEmbedding, QLinear, QWeight
from tricklm.model.weights.quant import DENSE_DTYPE, quantize


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def load_config(model_dir: Path) -> ModelConfig:
    return ModelConfig.from_dict(read_json(model_dir / "config.json"))


def load_model(
    model_dir: Path,
    dtype: torch.dtype = torch.float32,
    quantization: str | WeightFormat = "none",
    prefill_weights: str = "auto",
) -> CausalLM:
    """The model of `model_dir`, its projections kept in `quantization` (a `WeightFormat`, or the
    `--quantization` text)."""
    cfg = load_config(model_dir)
    cls = model_class(cfg.architecture)
    with _MetaParameters():
        model = cls(cfg)
    link = model_dir / GGUF_LINK
    if link.is_symlink() and not link.exists():
        raise ModelLoadError(f"{link} points to {link.readlink()}, which is gone: pass the .gguf file again")
    gguf = weights_reader(link) if link.exists() else None
    try:
        fmt = weight_format(quantization, gguf is not None)
    except ValueError as e:
        raise ModelLoadError(f"{model_dir}: {e}") from None
    direct: set[str] = set()
    if gguf is not None and fmt.blocks:
        direct = _block_projections_from_gguf(model, gguf, cfg, fmt)
    # Allocated uninitialised and already in the final dtype, so the float32 checkpoint is converted tensor
    # by tensor and never held whole; every parameter is then overwritten (checked below).
    model = _materialized(_storage_dtypes(model, dtype, fmt))
    _reset_buffers(model)
    staging = torch.float16 if fmt.compact else dtype  # see _storage_dtypes
    if gguf is not None:
        weights = dense_tensors(gguf, cfg, skip=direct, matrix_dtype=staging)
    else:
        weights = _iter_safetensors(model_dir)
    loaded = model.load_weights(weights)
    missing = sorted(set(dict(model.named_parameters())) - loaded)
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise ModelLoadError(f"{model_dir}: {len(missing)} weights missing from the checkpoint: {shown}")
    model = model.eval().requires_grad_(False)
    if fmt.compact:
        model = quantize(model, fmt, prefill_weights)
    release_freed_memory()  # the loader's staging buffers
    return model


class _MetaParameters(TorchFunctionMode):
    """Builds a model with its parameters on the meta device (no memory), and nothing computed on meta.

    Under `torch.device("meta")` torch computes some ops on meta tensors (`normal_`, nn.Embedding's
    initialiser; RoPE tables) through reference implementations that import torch._dynamo, and with it
    sympy, resident for the server's whole life (`benchmarks/README.md`), for values a meta tensor does not keep. Here
    only `torch.empty`, which the modules' parameters are made by, lands on meta; their initialisers are
    skipped; the small buffers (RoPE tables) are computed on the CPU, and again by `_reset_buffers`
    once the model is real.
    """

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            return func(*args, **{**kwargs, "device": "meta"})
        # torch.nn.init passes its tensor by keyword
        first, name = args[0] if args else kwargs.get("tensor"), getattr(func, "__name__", "")
        in_place = name.endswith("_") and not name.startswith("__")  # normal_, not a property's __get__
        if in_place and isinstance(first, torch.Tensor) and first.is_meta:
            return first
        return func(*args, **kwargs)


TRIM_EVERY = 4  # projections built between two heap trims: one decoder layer's


def _block_projections_from_gguf(model: CausalLM, reader: WeightsFile, cfg: ModelConfig, fmt: WeightFormat) -> set[str]:
    """Every decoder projection, the token table and the output head of a model still on the meta
    device, built from the file's blocks (see `projection_blocks`) as QLinear / QEmbedding modules: no
    float copy of them ever exists. The table and head are rounded to no fewer than 8 bits, whatever the
    mode (llama.cpp keeps the output at 6 bits or more). In "gguf" mode a tensor stored in a float type is
    left to the dense loader (it stays float: fp16), as the file keeps it.

    Returns the file's tensor names used, for the dense loader to skip. Fused projections (qkv,
    gate_up) collect their parts' rows at the offsets the model gives them.
    """
    slots = {f"{name}.weight": module for name, module in model.named_modules() if _is_block_slot(name, module)}
    sources: dict[str, list[FileTensor]] = {}
    for t in reader.tensors:
        if t.name in ROPE_FACTOR_TENSORS:
            continue
        target = model.map_name(hf_name(t.name, cfg.architecture))[0]
        if target in slots:
            sources.setdefault(target, []).append(t)
    if fmt is WeightFormat.GGUF:  # a fused projection with any float part stays float whole
        sources = {k: ts for k, ts in sources.items() if not any(tensor_type(t) in FLOAT_TYPES for t in ts)}
    names = {hf_name(t.name, cfg.architecture) for ts in sources.values() for t in ts}
    tables = {n for n in names if _is_table(n, slots[model.map_name(n)[0]])}
    # The table first: its repacking buffers are the load's largest, best spent before the rest is held
    found = chain(
        projection_blocks(reader, cfg, tables, "q8_0"),
        projection_blocks(reader, cfg, names - tables, fmt.rounding),
    )
    parts: dict[str, list[tuple[int, Blocks]]] = {}
    built = 0
    for name, blocks in found:
        target, offset = model.map_name(name)
        parts.setdefault(target, []).append((offset or 0, blocks))
        slot = slots[target]
        wanted = _slot_shape(slot)
        if sum(b[0].shape[0] for _, b in parts[target]) == wanted[0]:
            pieces = [b for _, b in sorted(parts.pop(target), key=lambda p: p[0])]
            weight = QWeight.from_blocks(*(torch.cat(t) for t in zip(*pieces, strict=True)))
            if weight.shape != wanted:
                raise ModelLoadError(f"{target} has shape {weight.shape} in the GGUF file, the model wants {wanted}")
            module = QEmbedding(weight) if isinstance(slot, torch.nn.Embedding) else QLinear(weight, None)
            model.set_submodule(target.removesuffix(".weight"), module)
            built += 1
            if built % TRIM_EVERY == 0:
                # The unpacked parts and repacking buffers are freed, but glibc keeps their heap pages
                # while the next buffers land elsewhere: without this the load of a large model peaks well above
                # the model (benchmarks/README.md). Each trim costs the next buffers fresh page faults, so not
                # after each one.
                release_freed_memory()
    if parts:
        raise ModelLoadError(f"projections incomplete in the GGUF file: {', '.join(sorted(parts))}")
    return names


def _is_block_slot(name: str, module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Embedding):
        return module.embedding_dim % BLOCK == 0
    return isinstance(module, torch.nn.Linear) and module.bias is None and module.in_features % BLOCK == 0


def _is_table(name: str, slot: torch.nn.Module) -> bool:
    """The token table or the output head: kept at 8 bits or more."""
    return isinstance(slot, torch.nn.Embedding) or name == "lm_head.weight"


def _slot_shape(slot: torch.nn.Module) -> tuple[int, int]:
    if isinstance(slot, torch.nn.Embedding):
        return slot.num_embeddings, slot.embedding_dim
    assert isinstance(slot, torch.nn.Linear)
    return slot.out_features, slot.in_features


def _storage_dtypes(model: CausalLM, dtype: torch.dtype, fmt: WeightFormat) -> CausalLM:
    """Quantized modes stage projections in float16 (what they are packed from), embedding tables in
    bfloat16 (what they are kept in: no second table exists while quantizing), norms in float32."""
    if not fmt.compact:
        return model.to(dtype=dtype)
    model = model.to(dtype=torch.float32)
    # A table rounded to blocks is staged in fp16, like the projections (bfloat16 would round it twice)
    table_dtype = torch.float16 if fmt.rounds else DENSE_DTYPE
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(dtype=torch.float16)
        elif isinstance(module, torch.nn.Embedding):
            module.to(dtype=table_dtype)
    return model


def _materialized(model: CausalLM) -> CausalLM:
    """`model.to_empty(device="cpu")`, but by `torch.empty`: `empty_like` of a meta tensor goes through
    torch's symbolic shapes, which import sympy (see `_MetaParameters`)."""
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype))
    return model


def _reset_buffers(model: torch.nn.Module) -> None:
    """Recompute non-persistent buffers (RoPE tables) that `to_empty` left uninitialised."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset()


def _iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open  # here: a server of a GGUF file never needs it

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
            for name in names:
                # One mapping per tensor: the file's pages leave resident memory as soon as the tensor is
                # copied out, instead of the whole checkpoint (538 MB for the default) staying mapped.
                with safe_open(str(file), framework="pt") as f:
                    tensor = f.get_tensor(name).float()
                yield name, tensor
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{file} is not a readable safetensors file: {e}") from None
