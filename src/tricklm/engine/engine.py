"""Engine: loads a model folder, starts the engine loop, and turns prompts into engine requests."""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tricklm.config import EngineConfig
from tricklm.engine.core import EngineCore
from tricklm.engine.loop import EngineLoop, Sink
from tricklm.engine.request import Request
from tricklm.engine.sampling_params import MODEL_DEFAULT_KEYS, SamplingParams
from tricklm.engine.structured import GrammarCompiler
from tricklm.memory import after_load, forget_load, release_freed_memory
from tricklm.model.base import CausalLM
from tricklm.model.resolve import model_name, resolve_model
from tricklm.model.weights.loader import load_config, load_model, read_json
from tricklm.model.weights.qlinear import check_isa
from tricklm.model.weights.quant import weight_bytes
from tricklm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    def __init__(self, max_model_len: int, num_prompt_tokens: int, num_completion_tokens: int) -> None:
        self.max_model_len = max_model_len
        self.num_prompt_tokens = num_prompt_tokens
        self.num_completion_tokens = num_completion_tokens
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + num_completion_tokens} tokens ({num_prompt_tokens} in the messages, "
            f"{num_completion_tokens} in the completion). Please reduce the length of the messages or completion."
        )


@dataclass(frozen=True)
class LoadInfo:
    model_dir: Path
    model_name: str
    load_seconds: float


class Engine:
    def __init__(self, config: EngineConfig | None = None, progress: bool = True) -> None:
        self.config = config or EngineConfig()
        start = time.monotonic()
        model_dir = resolve_model(self.config.model, progress=progress)
        self.tokenizer = Tokenizer(model_dir)
        self.generation_defaults = generation_defaults(model_dir)
        # llguidance's token table is built by the first constrained request (structured.py)
        self.grammars = GrammarCompiler(
            self.tokenizer.backend_json,
            max(self.tokenizer.vocab_size, load_config(model_dir).vocab_size),
            sorted(self.tokenizer.eos_token_ids),
        )
        release_freed_memory()  # the tokenizer's build leaves freed heap: handed back before the weights come in
        cfg = self.config
        check_isa()  # a bad TRICKLM_ISA is refused here, not by every step once serving
        model = load_model(model_dir, cfg.torch_dtype, cfg.quantization, cfg.prefill_weights)
        self.core = EngineCore(model, self.config)
        after_load()
        self.loop = EngineLoop(self.core, self.config.max_queue)
        name = model_name(self.config.model, model_dir)
        # what it holds for its life: weights, and the KV cache's budget (resident as it fills)
        self.memory_bytes = sum(weight_bytes(model).values()) + self.core.kv_cache.nbytes
        self.info = LoadInfo(model_dir, name, time.monotonic() - start)
        self._ids = itertools.count()
        logger.info("loaded %s from %s in %.1fs", name, model_dir, self.info.load_seconds)
        logger.info("memory: %s", memory_summary(model, self.core.kv_cache.nbytes))

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        """Validate length against the context window; resolve max_tokens=None to the rest of it."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt must contain at least one token")
        room = self.max_model_len - n
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if room < 1 or max_tokens > room:
            raise ContextLengthError(self.max_model_len, n, max_tokens if params.max_tokens is not None else 1)
        return Request(request_id, prompt_token_ids, params, max_tokens, self.tokenizer.eos_token_ids)

    def submit(self, req: Request, sink: Sink) -> None:
        self.loop.submit(req, sink)

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    def shutdown(self) -> None:
        self.loop.shutdown()
        forget_load()


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling defaults from generation_config.json (only when it asks for sampling at all)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    cfg = read_json(path)
    if cfg.get("do_sample") is False:
        return {}
    return {k: cfg[k] for k in MODEL_DEFAULT_KEYS if isinstance(cfg.get(k), int | float)}


def memory_summary(model: CausalLM, kv_bytes: int) -> str:
    """One line for the log: weights by format, the KV cache's budget, and the process's resident size."""
    weights = weight_bytes(model)
    by_format = ", ".join(f"{kind} {n / 2**20:.0f}" for kind, n in sorted(weights.items(), key=lambda kv: -kv[1]))
    line = f"weights {sum(weights.values()) / 2**20:.0f} MiB ({by_format}); KV cache budget {kv_bytes / 2**20:.0f} MiB"
    try:
        with open("/proc/self/statm") as f:  # Linux; elsewhere the line just says less
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return line
    return f"{line} (resident as it fills); process resident now {rss / 2**20:.0f} MiB"
