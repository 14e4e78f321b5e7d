"""Chat streams beside an embedding flood, in one server: does embedding work stall the streams?

One `tricklm serve --model SmolLM2-135M-Instruct --model all-MiniLM-L6-v2` process. Each round measures 4 chat
streams (`tricklm bench --endpoint chat --dataset prompts --max-concurrency 4`) alone, then again while a
flood of embedding requests (64 texts each, 2 in flight, from the same prompt sets) runs beside them until
the chat run ends. Printed: chat ITL and TTFT p50 with and without the flood (medians over rounds), and the
texts a second the flood got.

    .venv/bin/python benchmarks/rag_mix.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import httpx
from api_overhead import cpu_name, serving

from tricklm.bench.runner import BenchConfig, run_benchmark
from tricklm.bench.workload import load_prompt_set

CHAT, EMBEDDER = "SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"
FLOOD_BATCH, FLOOD_IN_FLIGHT = 64, 2
FLOOD_MAX_S = 600.0  # a flood stops by itself after this, whatever the chat run does


async def chat_run(base: str, args: argparse.Namespace, seed: int) -> tuple[float, float]:
    config = BenchConfig(
        base_url=base,
        model=CHAT,
        endpoint="chat",
        dataset="prompts",
        num_prompts=args.num_prompts,
        output_len=args.output_len,
        max_concurrency=4,
        warmup=0,
        seed=seed,
    )
    bench = await run_benchmark(config, progress=False)
    summary = bench.runs[0].summary
    assert summary.failed == 0, summary.errors
    assert summary.itl_ms.p50 is not None and summary.ttft_ms.p50 is not None
    return summary.itl_ms.p50, summary.ttft_ms.p50


async def flood(base: str, stop: asyncio.Event) -> float:
    """Embedding requests, FLOOD_IN_FLIGHT at a time, until `stop`; texts a second."""
    texts = load_prompt_set("prompts") + load_prompt_set("rewrite")
    done = 0
    start = time.perf_counter()

    async def worker(client: httpx.AsyncClient, offset: int) -> None:
        nonlocal done
        i = offset
        while not stop.is_set() and time.perf_counter() - start < FLOOD_MAX_S:
            batch = [texts[(i + k) % len(texts)] for k in range(FLOOD_BATCH)]
            body = {"model": EMBEDDER, "input": batch, "truncate": True}
            response = await client.post(f"{base}/v1/embeddings", json=body, timeout=300)
            response.raise_for_status()
            done += FLOOD_BATCH
            i += FLOOD_BATCH

    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(worker(client, 7 * k) for k in range(FLOOD_IN_FLIGHT)))
    return done / (time.perf_counter() - start)


async def with_flood(base: str, args: argparse.Namespace, seed: int) -> tuple[float, float, float]:
    stop = asyncio.Event()
    flooding = asyncio.create_task(flood(base, stop))
    await asyncio.sleep(1.0)  # the flood is under way before the streams start
    try:
        itl, ttft = await chat_run(base, args, seed)
    finally:
        stop.set()
    return itl, ttft, await flooding


async def measure(base: str, args: argparse.Namespace) -> None:
    alone, mixed, rates = [], [], []
    await chat_run(base, args, 99)  # warm-up
    for r in range(args.rounds):
        alone.append(await chat_run(base, args, r))
        itl, ttft, rate = await with_flood(base, args, r)
        mixed.append((itl, ttft))
        rates.append(rate)
        print(
            f"round {r + 1}: ITL p50 {alone[-1][0]:.1f} -> {itl:.1f} ms, TTFT p50 {alone[-1][1]:.0f} -> {ttft:.0f} ms, "
            f"flood {rate:.1f} texts/s"
        )
    a_itl, m_itl = statistics.median(x[0] for x in alone), statistics.median(x[0] for x in mixed)
    a_ttft, m_ttft = statistics.median(x[1] for x in alone), statistics.median(x[1] for x in mixed)
    print("| 4 chat streams | alone | beside an embedding flood | ratio |")
    print("|---|---|---|---|")
    print(f"| ITL p50 (ms) | {a_itl:.1f} | {m_itl:.1f} | {m_itl / a_itl:.2f} |")
    print(f"| TTFT p50 (ms) | {a_ttft:.0f} | {m_ttft:.0f} | {m_ttft / a_ttft:.2f} |")
    print(
        f"flood: {statistics.median(rates):.1f} texts/s (median), {FLOOD_BATCH} texts a request, "
        f"{FLOOD_IN_FLIGHT} in flight"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    args = p.parse_args()
    print(f"CPU: {cpu_name()}, TRICKLM_ISA={os.environ.get('TRICKLM_ISA', '(auto)')}")
    with serving(None, "--model", CHAT, "--model", EMBEDDER) as base:
        asyncio.run(measure(base, args))


if __name__ == "__main__":
    main()
