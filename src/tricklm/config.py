"""Engine and server settings: small frozen dataclasses, validated on creation; the CLI reads its defaults here."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from tricklm.model.weights.modes import PREFILL_FORMATS, check_quantization

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

DTYPES = ("float32", "bfloat16")  # torch's dtypes of these names


# Speculative decoding's drafters (engine/speculative.py); here, so that reading a config needs no torch
SPECULATIVE_MODES = ("none", "ngram")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct)
    dtype: str = "float32"
    # "auto" (default): "gguf" for a GGUF file, "int4" for a safetensors folder.
    # "gguf": one copy of the file's own types (4- or 8-bit blocks, model/weights/blocks.py) read by every
    # step through int8 kernels (model/weights/qlinear.py). "q4_0", "q4_1", "q4_k", "q8_0": the same, every
    # projection rounded to that format at load as llama.cpp's `quantize` does (GGUF types that fit are
    # read exactly). "int4": decode steps read 4-bit weights where the checkpoint's already are, packed
    # fp16 elsewhere; large steps read a bfloat16 copy. "fp16-only": fp16 weights for every step, no copies.
    # All these keep float32 activations and an fp16 KV cache (model/weights/quant.py). "none": everything in
    # `dtype` (float32 is the exact reference). The loader turns the name into a `WeightFormat`
    # (model/weights/modes.py).
    quantization: str = "auto"
    # The format of the copy prefill (large) steps read in "int4": "bf16" (oneDNN) or "fp16"
    # (fbgemm), whichever the CPU runs faster; "auto" times both at load (model/weights/quant.py).
    prefill_weights: str = "auto"
    max_model_len: int | None = None  # None: the model's own context length
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 256
    max_queue: int = 256
    kv_cache_memory: int | None = None  # bytes; None: derived from max_num_seqs x max_model_len, capped
    block_size: int = 16
    num_threads: int | None = None  # torch threads for large steps; None: all cores
    decode_threads: int | None = None  # torch threads for small (decode) steps; None: as num_threads
    # Decode steps of a 4-bit Llama-family model in C++ (model/native); off, or where it cannot be
    # built, they run in Python with the same results, more slowly.
    native_decode: bool = True
    # Requests start after the longest prefix of their tokens already in the KV cache (kv_cache.py)
    enable_prefix_caching: bool = True
    # "ngram": decoding requests draft tokens from their own prompt and output, verified in the step
    # (engine/speculative.py); "none": one token per step
    speculative: str = "none"
    num_speculative_tokens: int = 10  # the longest draft

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        check_quantization(self.quantization)
        if self.prefill_weights not in PREFILL_FORMATS:
            raise ValueError(f"prefill_weights must be one of {', '.join(PREFILL_FORMATS)}")
        positive = {
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "block_size": self.block_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.decode_threads is not None and self.decode_threads < 1:
            raise ValueError("decode_threads must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError("kv_cache_memory must be positive")
        if self.speculative not in SPECULATIVE_MODES:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_MODES)}")
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError("num_speculative_tokens must be between 1 and 32")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of activations and the KV cache."""
        import torch  # here, so that reading a config does not import torch

        return getattr(torch, self.dtype) if self.quantization == "none" else torch.float32


# Without an explicit budget the KV cache may not exceed this; preemption handles the rare overflow.
DEFAULT_KV_CACHE_CAP = 256 * 1024 * 1024


# A request body larger than this is refused (413) before it is parsed: room for a full context of
# text or token ids at the model lengths we serve. Parsing holds the GIL (json's C scanner, twice: the
# body check and the route) for a time that grows with the body, so this also bounds that stall.
DEFAULT_MAX_REQUEST_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()  # each model's id in /v1/models, in --model order; else its own
    models: tuple[str, ...] = ()  # models served beside the first (--model given more than once)
    memory_limit: int | None = None  # bytes all models together may hold (weights and KV budgets); None: no limit
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object per line, access and stats fields as keys
    log_requests: bool = False  # prompt and output text in the access lines (users' data: off by default)
    stats_interval: float = 10.0  # seconds between stats lines; 0: none
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    api_keys: tuple[str, ...] = ()  # empty: no key needed (say so loudly off loopback)
    allowed_origins: tuple[str, ...] = ()  # CORS: empty is same-origin only; "*" allows any, without credentials
    metrics_public: bool = False  # /metrics without a key
    # On SIGTERM/SIGINT: requests in flight may finish for this long, then end with an error; a second
    # signal exits at once. Under Kubernetes' default 30 s grace period, so the error events get out.
    shutdown_timeout: float = 25.0
    request_timeout: float | None = None  # seconds from submission; None: no limit
    # Slow clients: a request's headers, then its body, must arrive within these (else 408 and close)
    header_timeout: float = 20.0
    body_timeout: float = 60.0
    # A thinking model's reasoning: "auto" returns it apart from the answer, "none" leaves it in the answer
    reasoning_format: str = "auto"
    reasoning_budget: int | None = None  # reasoning tokens before the thinking is closed; None: no limit

    def __post_init__(self) -> None:
        if self.reasoning_format not in ("auto", "none"):
            raise ValueError("reasoning_format must be auto or none")
        if self.reasoning_budget is not None and self.reasoning_budget < 0:
            raise ValueError("reasoning_budget must be 0 or more (0 turns thinking off)")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be at least 1024")
        if self.request_timeout is not None and not 0 < self.request_timeout <= 24 * 3600:
            raise ValueError("request_timeout must be between 0 and 86400 seconds")
        for name in ("header_timeout", "body_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"{name} must be between 0 and 3600 seconds")
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be text or json")
        if not 0 <= self.stats_interval <= 24 * 3600:
            raise ValueError("stats_interval must be between 0 and 86400 seconds")
        if not 0 <= self.shutdown_timeout <= 24 * 3600:
            raise ValueError("shutdown_timeout must be between 0 and 86400 seconds")


@dataclass(frozen=True)
class ReplicaPlan:
    """`tricklm serve --replicas`: how many engine replicas, each reserving (and using) this many CPUs."""

    replicas: int
    cpus_per_replica: int
    ray_address: str | None = None  # None: start a local Ray instance


def config_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build a config dataclass from the parsed options named like its fields (the rest keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    return cls(**{**values, **overrides})
