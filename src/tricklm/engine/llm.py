"""The synchronous API: `generate`, `generate_stream` and offline batches, all on the shared engine loop."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any, overload

from tricklm.config import EngineConfig
from tricklm.engine.engine import Engine
from tricklm.engine.output import Delta, OutputProcessor
from tricklm.engine.request import EngineOutput
from tricklm.engine.sampling_params import SamplingParams, with_model_defaults


class GenerationError(RuntimeError):
    pass


class LLM:
    def __init__(self, model: str | None = None, engine: Engine | None = None, **config: Any) -> None:
        self.engine = engine or Engine(EngineConfig(model=model, **config))

    def params(self, max_tokens: int | None = 128, stop: Sequence[str] | None = None, **values: Any) -> SamplingParams:
        """Keyword arguments are SamplingParams fields; those not given take the model's defaults."""
        return with_model_defaults(self.engine.generation_defaults, max_tokens, stop=tuple(stop or ()), **values)

    def generate_stream(self, prompt: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """One dict per token: the first carries `prefill_time_ms`, later ones `step_ms`."""
        start = last = time.monotonic()
        first = True
        for delta, _ in self._run([prompt], self.params(**kwargs)):
            now = time.monotonic()
            for i, token_id in enumerate(delta.token_ids):
                item: dict[str, Any] = {
                    "token": delta.text if i == len(delta.token_ids) - 1 else "",
                    "token_id": token_id,
                }
                item["prefill_time_ms" if first else "step_ms"] = round(1000 * (now - (start if first else last)), 3)
                first = False
                yield item
            last = now

    @overload
    def generate(self, prompt: str, **kwargs: Any) -> dict[str, Any]: ...
    @overload
    def generate(self, prompt: list[str], **kwargs: Any) -> list[dict[str, Any]]: ...

    def generate(self, prompt: str | list[str], **kwargs: Any) -> dict[str, Any] | list[dict[str, Any]]:
        """A string gives one result; a list is run as one offline batch (results in input order)."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        processors: dict[int, OutputProcessor] = {}
        for _, (index, proc) in self._run(prompts, self.params(**kwargs)):
            processors[index] = proc
        results = [summarize(processors[i]) for i in range(len(prompts))]
        return results[0] if isinstance(prompt, str) else results

    def _run(self, prompts: list[str], params: SamplingParams) -> Iterator[tuple[Delta, tuple[int, OutputProcessor]]]:
        engine = self.engine
        inbox: queue.Queue[EngineOutput] = queue.Queue()
        live: dict[str, tuple[int, OutputProcessor]] = {}
        try:
            for index, prompt in enumerate(prompts):
                ids = engine.tokenizer.encode(prompt)
                req = engine.make_request(engine.new_request_id("llm"), ids, params)
                live[req.request_id] = (index, OutputProcessor(engine.tokenizer, params, len(ids)))
                engine.submit(req, inbox.put)
            while live:
                out = inbox.get()
                index, proc = live[out.request_id]
                delta = proc.process(out)
                if delta.error:
                    raise GenerationError(delta.error)
                if delta.finished:
                    del live[out.request_id]
                    if not out.finished:
                        engine.abort(out.request_id)  # a stop string ended it before the engine did
                yield delta, (index, proc)
        finally:
            for request_id in live:
                engine.abort(request_id)

    def shutdown(self) -> None:
        self.engine.shutdown()


def summarize(proc: OutputProcessor) -> dict[str, Any]:
    """The non-streaming result: text, tokens, finish reason and timings."""
    t = proc.timings
    end = t.last_token or time.monotonic()
    total = end - t.arrival
    decode_time = end - (t.first_token or end)
    n = len(proc.token_ids)
    # asked for with `logprobs=k`: each token's log-probability and the k most likely at its step
    logprobs = {"logprobs": [asdict(lp) for lp in proc.logprobs]} if proc.logprobs is not None else {}
    return {
        **logprobs,
        "text": proc.text,
        "token_ids": list(proc.token_ids),
        "finish_reason": proc.finish_reason,
        "prompt_tokens": proc.num_prompt_tokens,
        "cached_tokens": proc.num_cached_tokens,
        "completion_tokens": n,
        "time_to_first_token_ms": round(1000 * ((t.first_token or end) - t.arrival), 3),
        "total_time_ms": round(1000 * total, 3),
        "tokens_per_second": round((n - 1) / decode_time, 3) if n > 1 and decode_time > 0 else 0.0,
    }
