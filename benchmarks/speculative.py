"""Speculative decoding (n-gram drafts) against none, one server each, the same workload, alternated.

For each round, a server with `--speculative none` and one with `--speculative ngram` (the order swapped
each round) run `tricklm bench` on the same prompts; printed per level: output tok/s of each, their
ratio, and the acceptance the ngram server reports. Greedy unless `--temperature`; requests end at the
model's end of turn (`--no-ignore-eos`), so what is measured is what a user would get.

    # real weights, input-grounded work and free-form chat, one stream and more
    .venv/bin/python benchmarks/speculative.py --dataset rewrite --sweep 1,2,4,8,16 --num-prompts 32
    .venv/bin/python benchmarks/speculative.py --dataset prompts --sweep 1 --num-prompts 32
    # the cost side: random weights of a real shape (drafts that are rejected)
    .venv/bin/python benchmarks/speculative.py --model 1.7b-q4_0.gguf --dataset prompts --sweep 1,16 --num-prompts 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from api_overhead import cpu_name, serving


def bench(base: str, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "tricklm", "bench", "--base-url", base, "--endpoint", "chat", "--no-progress"]
    cmd += ["--dataset", args.dataset, "--sweep", args.sweep, "--num-prompts", str(args.num_prompts)]
    cmd += ["--output-len", str(args.output_len), "--temperature", str(args.temperature), "--no-ignore-eos"]
    cmd += ["--json-out", str(out), "--seed", "0", "--warmup", "2"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    return list(json.loads(out.read_text())["runs"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dataset", default="rewrite", choices=("rewrite", "prompts", "random"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sweep", default="1")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--serve-args", default="", help="more `tricklm serve` options for both servers")
    args = p.parse_args()
    print(f"CPU: {cpu_name()}, TRICKLM_ISA={os.environ.get('TRICKLM_ISA', '(auto: the best this CPU has)')}")
    results: dict[tuple[int, str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in ("none", "ngram") if r % 2 == 0 else ("ngram", "none"):
                with serving(args.model, "--speculative", mode, *args.serve_args.split()) as base:
                    for run in bench(base, args, Path(tmp) / f"{mode}-{r}.json"):
                        results[(r, mode, run["max_concurrency"])] = run
    model = args.model or "the default"
    print(f"dataset {args.dataset}, temperature {args.temperature}, up to {args.output_len} tokens, model {model}")
    head = ("round", "streams", "none tok/s", "ngram tok/s", "ratio", "acceptance", "ITL p50 none/ngram (ms)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (r, mode, level), run in sorted(results.items()):
        if mode != "ngram":
            continue
        off, on = results[(r, "none", level)]["summary"], run["summary"]
        spec = run.get("speculation") or {}
        drafted = spec.get("draft_tokens") or 0
        acceptance = f"{spec['accepted_tokens'] / drafted:.0%} of {drafted:.0f}" if drafted else "no drafts"
        ratio = on["output_throughput"] / off["output_throughput"]
        itl = f"{off['itl_ms']['p50']:.1f} / {on['itl_ms']['p50']:.1f}"
        cells = (
            r,
            level,
            f"{off['output_throughput']:.1f}",
            f"{on['output_throughput']:.1f}",
            f"{ratio:.2f}",
            acceptance,
            itl,
        )
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
