"""The asyncio side: one queue per request, fed from the engine thread; cancelling aborts the request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from tricklm.engine.engine import Engine
from tricklm.engine.output import Delta, OutputProcessor
from tricklm.engine.request import EngineOutput
from tricklm.engine.sampling_params import SamplingParams


class RequestStream:
    """Submitted on creation (so errors surface before a response starts); iterate for deltas.

    Leaving the iteration early for any reason (client gone, task cancelled) aborts the request.
    """

    def __init__(self, engine: Engine, prompt_token_ids: list[int], params: SamplingParams, request_id: str) -> None:
        self.engine = engine
        self.request_id = request_id
        req = engine.make_request(request_id, prompt_token_ids, params)
        self.processor = OutputProcessor(engine.tokenizer, params, len(prompt_token_ids))
        self._queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self._done = False
        loop = asyncio.get_running_loop()

        def sink(out: EngineOutput) -> None:
            # RuntimeError: the event loop is gone (shutdown), so nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._queue.put_nowait, out)

        engine.submit(req, sink)

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            while not self._done:
                out = await self._queue.get()
                delta = self.processor.process(out)
                if delta.finished:
                    self._done = True
                    if not out.finished:
                        self.engine.abort(self.request_id)  # stopped by a stop string
                yield delta
        finally:
            self.close()

    async def collect(self) -> OutputProcessor:
        """Run to the end; the processor holds the whole text, tokens and timings."""
        async for _ in self:
            pass
        return self.processor

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def stream(self, prompt_token_ids: list[int], params: SamplingParams, prefix: str = "req") -> RequestStream:
        return RequestStream(self.engine, prompt_token_ids, params, self.engine.new_request_id(prefix))
