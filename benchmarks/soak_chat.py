"""Conversation soak with prefix caching: serve with default settings, run `--conversations` chats (16 at
a time, each `--turns` turns resending its history, all sharing one system prompt) in rounds of 100, and
print the server's resident memory after each round. The check: RSS after the last round stays within
`--bound-mib` of RSS after the first (the cache reuses its budget; it must not grow past it).
Since the KV cache became resident as it is written, the prefix cache's budget (256 MiB by default) fills
during the first rounds and shows as growth until it is full: read the check against it (a leak keeps
growing after the budget is full; the cache does not).

    .venv/bin/python benchmarks/soak_chat.py [--conversations 1000] [--turns 2] [-- serve args]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
from soak import rss_mib, serving

from tricklm.bench.client import Target
from tricklm.bench.conversation import Conversation, make_conversations, run_conversations

ROUND = 100


async def rounds(base: str, pid: int, total: int, turns: int) -> list[float]:
    samples = []
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(base + "/v1/models")).json()["data"][0]["id"]
        target = Target(base, model, endpoint="chat", output_len=16, ignore_eos=True)
        shared = make_conversations(1, 1, 30, 200, seed=0)[0].system  # one system prompt for every conversation
        for i in range(total // ROUND):
            conversations = [
                Conversation(shared, c.user_turns) for c in make_conversations(ROUND, turns, 30, 0, seed=i + 1)
            ]
            records = await run_conversations(client, target, conversations, 16)
            failed = sum(not r.is_ok for r in records)
            cached = sum(r.cached_tokens or 0 for r in records) / max(1, sum(r.prompt_tokens or 0 for r in records))
            samples.append(rss_mib(pid))
            print(
                f"{(i + 1) * ROUND:5d} conversations  {time.monotonic() - start:5.0f} s  {failed} failed  "
                f"cached {cached:.0%} of prompt tokens  rss {samples[-1]:.0f} MiB",
                flush=True,
            )
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--bound-mib", type=float, default=64.0)
    args, serve_args = parser.parse_known_args()
    with serving(serve_args) as served:
        pid = served.proc.pid
        print(f"command: {' '.join(served.cmd[1:])}\nidle after load: {rss_mib(pid):.0f} MiB", flush=True)
        samples = asyncio.run(rounds(served.base, pid, args.conversations, args.turns))
        growth = samples[-1] - samples[0]
        print(
            f"rss after the first round {samples[0]:.0f} MiB, after the last {samples[-1]:.0f} MiB, "
            f"growth {growth:+.0f} MiB"
        )
        return 0 if served.alive and growth <= args.bound_mib else 1


if __name__ == "__main__":
    raise SystemExit(main())
