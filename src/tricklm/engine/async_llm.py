"""The asyncio side: one queue per request, fed from the engine thread; cancelling aborts the request."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable

from tricklm.engine.engine import Engine
from tricklm.engine.output import Delta, OutputProcessor
from tricklm.engine.request import EngineOutput
from tricklm.engine.sampling_params import SamplingParams


class Mailbox:
    """Carries engine outputs into one event loop, waking it once per batch rather than once per output.

    The engine thread posts every request's output of a step in a row; only the first of them schedules
    a drain, so a 16-stream step costs the event loop one wake-up, not sixteen.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[tuple[asyncio.Queue[EngineOutput], EngineOutput]] = collections.deque()
        self._drain_pending = False

    def post(self, queue: asyncio.Queue[EngineOutput], out: EngineOutput) -> None:
        """Any thread."""
        self._items.append((queue, out))
        if not self._drain_pending:
            self._drain_pending = True
            # RuntimeError: the event loop is gone (shutdown), so nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        # Cleared before emptying: an item posted meanwhile is either taken now or schedules a new drain.
        self._drain_pending = False
        while self._items:
            queue, out = self._items.popleft()
            queue.put_nowait(out)


class RequestStream:
    """Submitted on creation (so errors surface before a response starts); iterate for deltas.

    Leaving the iteration early for any reason (client gone, task cancelled) aborts the request.
    """

    def __init__(
        self,
        engine: Engine,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        mailbox: Mailbox,
        timeout: float | None = None,
        on_end: Callable[[OutputProcessor], None] | None = None,
    ) -> None:
        self.engine = engine
        self._on_end = on_end  # called once, however the stream ends: metrics count every request once
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.timeout = timeout
        self.expired = False  # ended by its timeout, not by the engine
        self._expiry_output: EngineOutput | None = None
        req = engine.make_request(request_id, prompt_token_ids, params)
        self.processor = OutputProcessor(engine.tokenizer, params, len(prompt_token_ids))
        self._queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self._done = False
        queue = self._queue

        def sink(out: EngineOutput) -> None:
            mailbox.post(queue, out)

        engine.submit(req, sink)
        # On the loop's clock, not on reads: a client that stopped reading still loses its slot on time
        self._expiry = None if timeout is None else asyncio.get_running_loop().call_later(timeout, self._expire)

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            while not self._done:
                out = await self._queue.get()
                # Only if the timeout's own error is what ends it: an engine error queued first still wins
                self.expired = out is self._expiry_output
                delta = self.processor.process(out)
                if delta.finished:
                    self._done = True
                    if not out.finished:
                        self.engine.abort(self.request_id)  # stopped by a stop string
                yield delta
        finally:
            self.close()

    @property
    def prompt_text(self) -> str:
        return self.engine.tokenizer.decode(self.prompt_token_ids)

    def _expire(self) -> None:
        """The request ran past its timeout: its slot is freed at the next step, its reader gets the reason."""
        if not self._done:
            self.engine.abort(self.request_id)
            self._expiry_output = EngineOutput(
                self.request_id, [], error=f"the request ran longer than {self.timeout:g} s"
            )
            self._queue.put_nowait(self._expiry_output)

    async def collect(self) -> OutputProcessor:
        """Run to the end; the processor holds the whole text, tokens and timings."""
        async for _ in self:
            pass
        return self.processor

    def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if not self._done:
            self._done = True
            self.engine.abort(self.request_id)
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(self.processor)


class AsyncEngine:
    def __init__(self, engine: Engine, request_timeout: float | None = None) -> None:
        self.engine = engine
        self.request_timeout = request_timeout  # seconds a request may run, from submission to its end
        # One mailbox per event loop (tests run several loops against one engine).
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()

    def stream(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefix: str = "req",
        on_end: Callable[[OutputProcessor], None] | None = None,
    ) -> RequestStream:
        loop = asyncio.get_running_loop()
        box = self._mailboxes.get(loop)
        if box is None:
            box = self._mailboxes[loop] = Mailbox(loop)
        request_id = self.engine.new_request_id(prefix)
        return RequestStream(self.engine, prompt_token_ids, params, request_id, box, self.request_timeout, on_end)
