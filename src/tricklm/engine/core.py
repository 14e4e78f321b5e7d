"""EngineCore: owns model, KV cache and scheduler; `step()` is the whole engine."""

from __future__ import annotations

import logging
import time

from tricklm.config import DEFAULT_KV_CACHE_CAP, EngineConfig
from tricklm.engine.kv_cache import KVCache, bytes_per_token
from tricklm.engine.model_runner import ModelRunner, ThreadPolicy
from tricklm.engine.request import EngineOutput, FinishReason, Request
from tricklm.engine.scheduler import Scheduler
from tricklm.engine.speculative import SpecConfig
from tricklm.memory import after_step
from tricklm.model.base import CausalLM
from tricklm.model.weights.quant import model_dtypes

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, model: CausalLM, config: EngineConfig) -> None:
        cfg = model.config
        self.config = config
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.dtype = model_dtypes(model)[1]  # the KV cache's
        self.kv_cache = KVCache(
            cfg, self._num_blocks(model), config.block_size, self.dtype, config.enable_prefix_caching
        )
        if self.kv_cache.capacity_tokens < self.max_model_len:
            # One request of full length must always fit, or it could wait forever.
            self.max_model_len = self.kv_cache.capacity_tokens
        spec = SpecConfig(config.speculative, config.num_speculative_tokens)
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens, spec)
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

    def recover(self) -> list[EngineOutput]:
        """After a step raised: restart from an empty cache, and find the request at fault.

        Each request of the failed step is recomputed alone, up to and including the token it was at:
        one whose lone step fails again is the cause and ends with an error; the others carry on with
        the same tokens (and may produce one here). Requests that were waiting just wait.
        """
        outputs: list[EngineOutput] = []
        for req in self.scheduler.restart():
            try:
                outputs += self._recompute_alone(req)
            except Exception as e:
                logger.exception("request %s fails alone: ending it", req.request_id)
                self.scheduler.abort(req.request_id)
                message = f"this request failed in the engine ({type(e).__name__}); the server log has the details"
                outputs.append(EngineOutput.failed(req, message))
        return outputs

    def fail_all(self, message: str) -> list[EngineOutput]:
        """End every live request with `message` (its client's error) and start over with an empty cache."""
        live = [*self.scheduler.running, *self.scheduler.waiting]
        self.scheduler.restart()
        for req in live:
            self.scheduler.abort(req.request_id)
        return [EngineOutput.failed(req, message) for req in live]

    def _recompute_alone(self, req: Request) -> list[EngineOutput]:
        outputs: list[EngineOutput] = []
        target = req.num_tokens
        while req.num_computed_tokens < target and (batch := self.scheduler.schedule_alone(req)):
            outputs += self.scheduler.update(batch, self.runner.run(batch))
        return outputs

    def step(self) -> list[EngineOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        start = time.perf_counter()
        sampled = self.runner.run(batch)
        after_step(time.perf_counter() - start)
        outputs = self.scheduler.update(batch, sampled)
        self.num_generation_tokens += sum(len(o.new_token_ids) for o in outputs)
        return outputs
