"""Mixed memory soak: serve with default settings and send 10,000 requests of every kind at 16-way
concurrency (chat and completions, streaming and not, /generate, clients that hang up mid-stream, and
requests that are refused: bad values, malformed JSON, unknown models, prompts over the context, bodies
over the size limit). Print the server's resident memory every `--every` requests; the check is that RSS
after all of them stays within `--bound-mib` of RSS after the first 100.
Since the KV cache became resident as it is written, the prefix cache's budget (256 MiB by default) fills
during the first rounds and shows as growth until it is full: read the check against it (a leak keeps
growing after the budget is full; the cache does not).

    .venv/bin/python benchmarks/soak_mixed.py [--requests 10000] [--every 1000] [-- serve args]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable

import httpx
from soak import rss_mib, serving

from tricklm.bench.workload import random_words

Kind = Callable[[httpx.AsyncClient, random.Random], Awaitable[int]]
MAX_TOKENS = 16


def _prompt(rng: random.Random) -> str:
    return random_words(rng, rng.randint(5, 120))


async def chat_stream(client: httpx.AsyncClient, rng: random.Random) -> int:
    body = {"messages": [{"role": "user", "content": _prompt(rng)}], "max_tokens": MAX_TOKENS, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for _ in r.aiter_bytes():
            pass
        return r.status_code


async def chat_whole(client: httpx.AsyncClient, rng: random.Random) -> int:
    body = {"messages": [{"role": "user", "content": _prompt(rng)}], "max_tokens": MAX_TOKENS}
    return (await client.post("/v1/chat/completions", json=body)).status_code


async def completion_stream(client: httpx.AsyncClient, rng: random.Random) -> int:
    body = {"prompt": _prompt(rng), "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for _ in r.aiter_bytes():
            pass
        return r.status_code


async def generate(client: httpx.AsyncClient, rng: random.Random) -> int:
    body = {"prompt": _prompt(rng), "max_tokens": MAX_TOKENS, "stream": rng.random() < 0.5}
    return (await client.post("/generate", json=body)).status_code


async def hang_up(client: httpx.AsyncClient, rng: random.Random) -> int:
    """Close the connection after the first event (or before any, a third of the time: during prefill)."""
    body = {"messages": [{"role": "user", "content": _prompt(rng)}], "max_tokens": 64, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if rng.random() < 0.67:
            async for _ in r.aiter_bytes():
                break
        return 499  # nginx's "client closed request": counted apart from the server's answers


async def refused(client: httpx.AsyncClient, rng: random.Random) -> int:
    choice = rng.randrange(5)
    if choice == 0:
        body: object = {"prompt": "hi", "temperature": -3}
        return (await client.post("/v1/completions", json=body)).status_code
    if choice == 1:
        return (await client.post("/v1/chat/completions", content=b'{"messages": [', headers=_JSON)).status_code
    if choice == 2:
        body = {"model": f"no-such-model-{rng.randrange(10**9)}", "prompt": "hi"}
        return (await client.post("/v1/completions", json=body)).status_code
    if choice == 3:
        return (await client.post("/v1/completions", json={"prompt": random_words(rng, 12_000)})).status_code
    return (await client.post("/v1/completions", content=b"x" * (3 << 20), headers=_JSON)).status_code


_JSON = {"content-type": "application/json"}
KINDS: list[tuple[Kind, float]] = [
    (chat_stream, 0.30),
    (chat_whole, 0.15),
    (completion_stream, 0.15),
    (generate, 0.10),
    (hang_up, 0.15),
    (refused, 0.15),
]


async def soak(base: str, pid: int, total: int, every: int, concurrency: int) -> list[tuple[int, float]]:
    rng = random.Random(0)
    plan = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS], k=total)
    statuses: collections.Counter[str] = collections.Counter()
    samples: list[tuple[int, float]] = []
    done = 0
    queue = iter(enumerate(plan))
    start = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def worker(seed: int) -> None:
            nonlocal done
            wrng = random.Random(seed)
            for _, kind in queue:
                try:
                    status = str(await kind(client, wrng))
                except httpx.HTTPError as e:
                    status = type(e).__name__
                statuses[f"{kind.__name__}:{status}"] += 1
                done += 1
                if done == 100 or done % every == 0:
                    samples.append((done, rss_mib(pid)))
                    print(
                        f"{done:6d} requests  {time.monotonic() - start:6.0f} s  rss {samples[-1][1]:.0f} MiB",
                        flush=True,
                    )

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    for key, count in sorted(statuses.items()):
        print(f"  {key:28s} {count}")
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bound-mib", type=float, default=64.0)
    args, serve_args = parser.parse_known_args()
    with serving(serve_args) as served:
        pid = served.proc.pid
        print(f"command: {' '.join(served.cmd[1:])}\nidle after load: {rss_mib(pid):.0f} MiB", flush=True)
        samples = asyncio.run(soak(served.base, pid, args.requests, args.every, args.concurrency))
        first, last = samples[0][1], samples[-1][1]
        print(
            f"rss after {samples[0][0]}: {first:.0f} MiB, after {samples[-1][0]}: {last:.0f} MiB, "
            f"growth {last - first:+.0f} MiB (bound {args.bound_mib:.0f}); server alive: {served.alive}"
        )
        return 0 if served.alive and last - first <= args.bound_mib else 1


if __name__ == "__main__":
    raise SystemExit(main())
