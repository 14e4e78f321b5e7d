"""The one path from started generations to an HTTP response, streamed or whole, for every route.

A route turns its request into a `Job` (one engine request per choice) and a `Renderer` (how that route
writes events and bodies); `respond` does the rest the same way for all of them: interleaving choices,
hang-ups, errors after the response began, and the [DONE] marker.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response

from tricklm.engine.async_llm import RequestStream
from tricklm.engine.output import Delta, OutputProcessor
from tricklm.engine.sampling_params import SamplingParams
from tricklm.server.engine_client import EngineClient
from tricklm.server.errors import APIError, stream_failure
from tricklm.server.sse import DONE, SSEResponse
from tricklm.server.state import engine_errors

T = TypeVar("T")


@dataclass
class Job:
    """One HTTP request's generations: `streams[p * n + i]` is prompt p's choice i."""

    streams: list[RequestStream]
    prompt_tokens: int
    n: int = 1

    def close(self) -> None:
        for s in self.streams:
            s.close()


class Renderer(ABC):
    """How one route writes a job: its streamed events and its whole response."""

    done: bytes | None = DONE  # the stream's last event (OpenAI's [DONE]; Anthropic's API has none)

    def opening(self, job: Job) -> list[bytes]:
        """Events before any token (chat's role deltas, an echoed prompt)."""
        return []

    @abstractmethod
    def delta(self, job: Job, index: int, delta: Delta) -> list[bytes]:
        """Events for choice `index`'s new output."""

    def closing(self, job: Job) -> list[bytes]:
        """Events once every choice has ended normally (a usage chunk)."""
        return []

    @abstractmethod
    def error_event(self, error: APIError) -> bytes:
        """The event that tells a streaming client its request failed after the response began."""

    @abstractmethod
    def response(self, job: Job, done: list[OutputProcessor]) -> Response:
        """The whole, non-streamed answer."""

    def failure(self, error: APIError) -> Response:
        raise error


def start_job(
    client: EngineClient,
    prompts: list[list[int]],
    params: SamplingParams,
    n: int = 1,
    prefix: str = "req",
    prompt_param: str = "prompt",
) -> Job:
    """Submit `n` choices per prompt; all or none (a refusal closes those already started)."""
    num_choices = len(prompts) * n
    if num_choices > client.max_queue:
        # 429 would invite a retry that can never succeed
        raise APIError(
            400,
            f"this request asks for {num_choices} completions (prompts x n), more than the server queues at once "
            f"({client.max_queue})",
            param="n" if n > 1 else "prompt",
        )
    streams: list[RequestStream] = []
    try:
        with engine_errors(prompt_param):
            for ids in prompts:
                for i in range(n):
                    choice_params = params
                    if params.seed is not None and i:  # distinct but reproducible choices
                        choice_params = replace(params, seed=params.seed + i)
                    streams.append(client.stream(ids, choice_params, prefix))
    except BaseException:
        for s in streams:
            s.close()
        raise
    return Job(streams, sum(len(p) for p in prompts), n)


async def respond(job: Job, renderer: Renderer, stream: bool, request: Request) -> Response:
    if stream:
        return SSEResponse(_events(job, renderer))
    done = await until_disconnect(request, _collect(job), job.close)
    job.close()  # ends each stream's accounting, whichever way it finished
    if done is None:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    failed = [s for s in job.streams if s.processor.finish_reason is None]
    if failed:
        return renderer.failure(stream_failure(failed[0]))
    return renderer.response(job, done)


async def _events(job: Job, renderer: Renderer) -> AsyncIterator[bytes]:
    try:
        for event in renderer.opening(job):
            yield event
        async for i, delta in _merge(job.streams):
            if delta.error:
                yield renderer.error_event(stream_failure(job.streams[i]))
                break
            for event in renderer.delta(job, i, delta):
                yield event
        else:
            for event in renderer.closing(job):
                yield event
    finally:  # a client that left counts as an abort, as in vLLM
        job.close()
    if renderer.done is not None:
        yield renderer.done


async def _collect(job: Job) -> list[OutputProcessor]:
    return list(await asyncio.gather(*(s.collect() for s in job.streams)))


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave the deltas of several streams as they arrive; leaving early closes all of them."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                await queue.put((i, delta))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for s in streams:
            s.close()


async def until_disconnect(request: Request, work: Awaitable[T], on_disconnect: Callable[[], None]) -> T | None:
    """Await `work`, but give up (call `on_disconnect`, return None) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            on_disconnect()
    if not task.done() or task.cancelled():
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
