"""Engine-only memory: the soak's request pattern through the offline `LLM` API, no HTTP.

Resident memory after each round of 100 requests (16 at a time, 100-word prompts, 32 tokens each);
compare with `soak.py` to tell engine growth from server growth.

    .venv/bin/python benchmarks/engine_memory.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import random

from tricklm.engine.llm import LLM
from tricklm.memory import limit_fragmentation

_WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from"]


def rss_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) // 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    limit_fragmentation()  # the server's malloc settings
    llm = LLM()
    rng = random.Random(0)
    try:
        for r in range(args.rounds):
            prompts = [" ".join(rng.choice(_WORDS) for _ in range(100)) for _ in range(100)]
            for i in range(0, len(prompts), 16):
                llm.generate(prompts[i : i + 16], max_tokens=32, temperature=0.0)
            print(f"round {r + 1}: {(r + 1) * 100} requests, rss {rss_mib()} MiB", flush=True)
    finally:
        llm.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
