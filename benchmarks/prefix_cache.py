"""Prefix caching on and off, same machine, same run: a fresh `tricklm serve` for each setting, then
(1) the second turn of a chat whose first turn sent a ~1,500-token message (`--conversations` of them,
one after another): TTFT of turn 2; (2) 16 conversations at once sharing a ~1,000-token system prompt:
TTFT p50/p99 and output throughput. Prints both settings and the ratios the issue targets.

    .venv/bin/python benchmarks/prefix_cache.py [--conversations 5] [-- serve args]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time

import httpx
from busy_machine import cpu_name
from soak import serving

from tricklm.bench.client import Target, count_tokens
from tricklm.bench.conversation import Conversation, run_conversations
from tricklm.bench.metrics import RequestRecord, ttft
from tricklm.bench.workload import CALIBRATION_WORDS, calibration_text, random_words


def words(rng: random.Random, tokens: int, per_word: float) -> str:
    return random_words(rng, max(1, round(tokens / per_word)))


async def scenario(base: str, conversations: int, seed: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(base + "/v1/models")).json()["data"][0]["id"]
        per_word = (
            await count_tokens(client, base, model, calibration_text()) or CALIBRATION_WORDS
        ) / CALIBRATION_WORDS
        rng = random.Random(seed)
        target = Target(base, model, endpoint="chat", output_len=32, ignore_eos=True)
        # (1) long history, then a short question, one conversation at a time
        chats = [Conversation("", (words(rng, 1500, per_word), words(rng, 20, per_word))) for _ in range(conversations)]
        records = await run_conversations(client, target, chats, 1)
        second = [_ttft(r) for r in records if r.turn == 2]
        first = [_ttft(r) for r in records if r.turn == 1]
        # (2) sixteen conversations at once, one system prompt
        system = words(rng, 1000, per_word)
        many = [Conversation(system, (words(rng, 50, per_word),)) for _ in range(16)]
        target = Target(base, model, endpoint="chat", output_len=64, ignore_eos=True)
        start = time.perf_counter()
        burst = await run_conversations(client, target, many, None)
        took = time.perf_counter() - start
    ttfts = sorted(_ttft(r) for r in burst)
    failed = sum(not r.is_ok for r in [*records, *burst])
    return {
        "turn1_ttft_p50": statistics.median(first),
        "turn2_ttft_p50": statistics.median(second),
        "burst_ttft_p50": statistics.median(ttfts),
        "burst_ttft_p99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
        "burst_tok_s": sum(r.output_tokens for r in burst) / took,
        "turn2_cached": statistics.median(float(r.cached_tokens or 0) for r in records if r.turn == 2),
        "burst_cached": statistics.median(float(r.cached_tokens or 0) for r in burst),
        "failed": float(failed),
    }


def _ttft(record: RequestRecord) -> float:
    value = ttft(record)
    if value is None:
        raise RuntimeError(f"request {record.index} failed: {record.error}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=5)
    args, serve_args = parser.parse_known_args()
    print(f"# {cpu_name()}; tricklm serve {' '.join(serve_args)} (+ --no-prefix-caching for 'off')")
    results = {}
    for name, extra in (("on", []), ("off", ["--no-prefix-caching"])):
        with serving([*serve_args, *extra]) as served:
            results[name] = asyncio.run(scenario(served.base, args.conversations, seed=0))
        r = results[name]
        print(
            f"caching {name:3s}: turn 1 TTFT p50 {r['turn1_ttft_p50'] * 1000:6.0f} ms, turn 2 TTFT p50 "
            f"{r['turn2_ttft_p50'] * 1000:6.0f} ms (cached {r['turn2_cached']:.0f} tokens); 16 with a shared "
            f"system prompt: TTFT p50 {r['burst_ttft_p50'] * 1000:5.0f} ms, p99 {r['burst_ttft_p99'] * 1000:5.0f} ms, "
            f"{r['burst_tok_s']:5.1f} tok/s (cached {r['burst_cached']:.0f}); failed {r['failed']:.0f}",
            flush=True,
        )
    on, off = results["on"], results["off"]
    print(
        f"turn 2 TTFT on/off: {on['turn2_ttft_p50'] / off['turn2_ttft_p50']:.1%} (target <= 15%); "
        f"burst TTFT p99 on/off: {on['burst_ttft_p99'] / off['burst_ttft_p99']:.1%} (target <= 40%); "
        f"burst throughput on/off: {on['burst_tok_s'] / off['burst_tok_s']:.2f}x (target >= 1)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
