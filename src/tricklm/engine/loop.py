"""Runs EngineCore.step() in a dedicated thread and routes each step's outputs to per-request sinks.

Other threads only enqueue commands (add, abort) under a condition variable; the loop thread alone
touches the scheduler, so no request state is shared. If a step raises, the core recovers (the request
at fault ends with an error, the others are recomputed) and the loop goes on. Only if recovery itself
fails does the loop mark itself dead, tell every live request, and refuse new ones (503, not a hang).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tricklm.engine.core import EngineCore
from tricklm.engine.request import EngineOutput, Request

logger = logging.getLogger(__name__)

Sink = Callable[[EngineOutput], None]

# Recovery ends the request at fault, so the next step normally succeeds; this many failed steps with
# no successful one between them mean the fault is not any request's
MAX_FAILURES_IN_A_ROW = 8


class EngineDeadError(RuntimeError):
    pass


class QueueFullError(RuntimeError):
    pass


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_prompt_tokens: int
    num_generation_tokens: int
    num_preemptions: int
    num_step_failures: int
    prefix_cache_queries: int = 0  # tokens looked up at admission
    prefix_cache_hits: int = 0  # of those, found cached
    spec_drafts: int = 0  # drafts verified (speculative decoding), their tokens, and those kept
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


class EngineLoop:
    def __init__(self, core: EngineCore, max_queue: int) -> None:
        self.core = core
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._incoming: list[tuple[Request, Sink]] = []
        self._aborts: list[str] = []
        self._end_all: str | None = None  # set by `end_all`: the message every live request is ended with
        self._closed: str | None = None  # after `end_all`: why new requests are refused
        self._sinks: dict[str, Sink] = {}
        # The scheduler's queue lengths as the engine thread last saw them: other threads read these (under
        # the lock), never the scheduler's lists, which the engine thread changes without it
        self._num_running = 0
        self._num_waiting = 0
        self._stopping = False
        self.restarting = False
        self.num_step_failures = 0
        self._failures_in_a_row = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tricklm-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def submit(self, req: Request, sink: Sink) -> None:
        with self._cond:
            if not self.is_alive:
                raise EngineDeadError(f"the engine has stopped: {self.error!r}")
            if self._closed is not None:
                raise EngineDeadError(self._closed)
            if len(self._incoming) + self._num_waiting >= self.max_queue:
                raise QueueFullError(f"the server is at capacity ({self.max_queue} requests waiting)")
            self._incoming.append((req, sink))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def end_all(self, message: str) -> None:
        """End every request in flight or waiting with `message` as its error, at the next step, and refuse
        any submitted later with it (a bounded shutdown's last act: a request that was being tokenized
        when the time ran out must not start a generation that nobody will wait for)."""
        with self._cond:
            self._end_all = self._closed = message
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            running, waiting = self._num_running, self._num_waiting + len(self._incoming)
        return EngineStats(
            running,
            waiting,
            self.core.kv_cache.usage,
            self.core.num_prompt_tokens,
            self.core.num_generation_tokens,
            self.core.scheduler.num_preemptions,
            self.num_step_failures,
            self.core.kv_cache.num_queried_tokens,
            self.core.kv_cache.num_hit_tokens,
            self.core.scheduler.num_drafts,
            self.core.scheduler.num_draft_tokens,
            self.core.scheduler.num_accepted_tokens,
        )

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while self._run_once():
                pass
        except BaseException as e:  # any failure must reach the waiting clients, not vanish with the thread
            logger.exception("engine loop died")
            self._die(e)

    def _run_once(self) -> bool:
        with self._cond:
            while not (self._stopping or self._incoming or self._aborts or self._end_all or self.core.has_work):
                self._cond.wait()
            if self._stopping:
                return False
            incoming, self._incoming = self._incoming, []
            aborts, self._aborts = self._aborts, []
            end_all, self._end_all = self._end_all, None
            self._num_waiting += len(incoming)  # counted as waiting until the step below admits them
        for req, sink in incoming:
            self._sinks[req.request_id] = sink
            self.core.add_request(req)
        for request_id in aborts:
            aborted = self.core.abort(request_id)
            if aborted is not None:
                self._deliver(aborted)
        if end_all is not None:
            for ended in self.core.fail_all(end_all):
                self._deliver(ended)
            self._count_queues()
            return True
        for out in self._step():
            self._deliver(out)
        self._count_queues()
        return True

    def _count_queues(self) -> None:
        scheduler = self.core.scheduler
        with self._cond:
            self._num_running, self._num_waiting = len(scheduler.running), len(scheduler.waiting)

    def _step(self) -> list[EngineOutput]:
        try:
            outputs = self.core.step()
        except Exception:  # one bad request or kernel call must not stop the service
            logger.exception("engine step failed; restarting the core")
            return self._recover()
        self._failures_in_a_row = 0
        return outputs

    def _recover(self) -> list[EngineOutput]:
        self.num_step_failures += 1
        self._failures_in_a_row += 1
        self.restarting = True
        try:
            if self._failures_in_a_row > MAX_FAILURES_IN_A_ROW:
                # Steps fail whoever is in them: no request is at fault, so none can be saved; each gets
                # its error (nobody hangs) and the engine starts afresh for whatever comes next
                self._failures_in_a_row = 0
                return self.core.fail_all(
                    f"this request failed in the engine: {MAX_FAILURES_IN_A_ROW} engine steps failed in a row"
                )
            return self.core.recover()
        finally:
            self.restarting = False

    def _deliver(self, out: EngineOutput) -> None:
        sink = self._sinks.pop(out.request_id) if out.finished else self._sinks.get(out.request_id)
        if sink is not None:
            sink(out)

    def _die(self, error: BaseException) -> None:
        with self._cond:
            self.error = error
            pending = [(req.request_id, sink) for req, sink in self._incoming]
            self._incoming = []
        for request_id, sink in [*self._sinks.items(), *pending]:
            sink(EngineOutput(request_id, [], error=f"engine failure: {error!r}"))
        self._sinks.clear()
