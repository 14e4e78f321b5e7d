"""The mailbox that carries engine outputs into an event loop: nothing lost, order kept, few wake-ups."""

from __future__ import annotations

import asyncio
import threading

from tricklm.engine.async_llm import Mailbox
from tricklm.engine.request import EngineOutput


def test_outputs_posted_from_another_thread_arrive_in_order_with_one_wakeup_per_burst() -> None:
    async def main() -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        box = Mailbox(loop)
        queues: list[asyncio.Queue[EngineOutput]] = [asyncio.Queue() for _ in range(4)]
        wakeups = 0
        schedule = loop.call_soon_threadsafe

        def counting(*args: object) -> asyncio.Handle:
            nonlocal wakeups
            wakeups += 1
            return schedule(*args)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]

        def engine_thread(steps: range) -> None:
            for step in steps:  # a step posts one output per request, back to back
                for i, q in enumerate(queues):
                    box.post(q, EngineOutput(f"r{i}", [step]))

        # The loop is blocked while the first 25 steps are posted (as when it is busy elsewhere): one wake-up
        # must carry them all. The next 25 race with the loop draining.
        first = threading.Thread(target=engine_thread, args=(range(25),))
        first.start()
        first.join()
        assert wakeups == 1
        threading.Thread(target=engine_thread, args=(range(25, 50),)).start()
        got: list[list[int]] = [[] for _ in queues]
        for i, q in enumerate(queues):
            while len(got[i]) < 50:
                got[i].extend((await asyncio.wait_for(q.get(), 5)).new_token_ids)
        return got, wakeups

    got, wakeups = asyncio.run(main())
    assert got == [list(range(50))] * 4  # nothing lost, each request's outputs in order
    assert wakeups <= 1 + 100


def test_posting_after_the_loop_closed_is_silent() -> None:
    loop = asyncio.new_event_loop()
    box = Mailbox(loop)
    loop.close()
    box.post(asyncio.Queue(), EngineOutput("r", [1]))  # no exception: nobody is listening any more
