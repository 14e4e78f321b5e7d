"""EngineCore: owns model, KV cache and scheduler; `step()` is the whole engine."""

from __future__ import annotations

from tricklm.config import DEFAULT_KV_CACHE_CAP, EngineConfig
from tricklm.engine.kv_cache import KVCache, bytes_per_token
from tricklm.engine.model_runner import ModelRunner, ThreadPolicy
from tricklm.engine.request import EngineOutput, FinishReason, Request
from tricklm.engine.scheduler import Scheduler
from tricklm.model.quant import model_dtypes
from tricklm.model.registry import CausalLM


class EngineCore:
    def __init__(self, model: CausalLM, config: EngineConfig) -> None:
        cfg = model.config
        self.config = config
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.dtype = model_dtypes(model)[1]  # type: ignore[arg-type]  # the KV cache's
        self.kv_cache = KVCache(cfg, self._num_blocks(model), config.block_size, self.dtype)
        if self.kv_cache.capacity_tokens < self.max_model_len:
            # One request of full length must always fit, or it could wait forever.
            self.max_model_len = self.kv_cache.capacity_tokens
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens)
        threads = ThreadPolicy(config.num_threads, config.decode_threads)
        self.runner = ModelRunner(model, self.kv_cache, threads, native=config.native_decode)
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    def _num_blocks(self, model: CausalLM) -> int:
        per_token = bytes_per_token(model.config, self.dtype)
        budget = self.config.kv_cache_memory
        if budget is None:
            max_len = self.config.max_model_len or model.config.max_position_embeddings
            budget = min(self.config.max_num_seqs * max_len * per_token, DEFAULT_KV_CACHE_CAP)
        return budget // (per_token * self.config.block_size)  # block 0 (never handed out) included

    def add_request(self, req: Request) -> None:
        self.num_prompt_tokens += req.num_prompt_tokens
        self.scheduler.add(req)

    def abort(self, request_id: str) -> EngineOutput | None:
        req = self.scheduler.abort(request_id)
        if req is None:
            return None
        return EngineOutput(request_id, [], FinishReason.ABORT, num_prompt_tokens=req.num_prompt_tokens)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[EngineOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sampled = self.runner.run(batch)
        outputs = self.scheduler.update(batch, sampled)
        self.num_generation_tokens += len(outputs)
        return outputs
