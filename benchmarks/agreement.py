"""Greedy agreement with the float32 model: how far a weight setting's answers drift from the exact ones.

Generates 32 greedy tokens for 27 short prompts, batched (the offline `LLM.generate` on a list), and for
the first 8 of them one at a time, once with `--quantization none` (float32, the reference) and once per
setting; prints how many prompts match the reference on all 32 tokens and the mean length of the
matching prefix. Near-ties flip on a last-bit difference, so compare settings, not single prompts.

    .venv/bin/python benchmarks/agreement.py                                  # bf16 and fp16 prefill copies
    .venv/bin/python benchmarks/agreement.py --settings int4:bf16,fp16-only:auto --no-native-decode
"""

from __future__ import annotations

import argparse

from tricklm.engine.llm import LLM

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain photosynthesis in simple terms.",
    "List three uses of copper:",
    "Once upon a time, in a small village,",
    "The quick brown fox",
    "What is 17 times 23?",
    "Translate 'good morning' into Spanish.",
    "The best way to learn a language is",
    "In 1969, astronauts",
    "A recipe for pancakes:",
    "The main causes of the French Revolution were",
    "Python is a programming language that",
    "The weather today is",
    "Dear hiring manager,",
    "The theory of relativity states",
    "Here is a joke:",
    "The three primary colors are",
    "To install the package, run",
    "My favourite book is",
    "The largest planet in the solar system is",
    "Water boils at",
    "A haiku about autumn:",
    "The stock market",
    "import numpy as np\n",
    "Summarize the plot of Hamlet.",
]
TOKENS = 32
SINGLE = 8  # prompts also run one at a time: a different batch shape, different rounding


def run(**config: object) -> tuple[list[list[int]], list[list[int]]]:
    llm = LLM(**config)  # type: ignore[arg-type]
    try:
        batched = [r["token_ids"] for r in llm.generate(PROMPTS, max_tokens=TOKENS, temperature=0.0)]
        single = [llm.generate(p, max_tokens=TOKENS, temperature=0.0)["token_ids"] for p in PROMPTS[:SINGLE]]
    finally:
        llm.shutdown()
    return batched, single


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def summary(got: list[list[int]], expected: list[list[int]]) -> str:
    prefixes = [common_prefix(g, e) for g, e in zip(got, expected, strict=True)]
    full = sum(p == TOKENS for p in prefixes)
    return f"all {TOKENS} tokens on {full}/{len(prefixes)}, mean prefix {sum(prefixes) / len(prefixes):.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="int4:bf16,int4:fp16", help="quantization:prefill-weights pairs")
    p.add_argument("--native-decode", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    ref_batched, ref_single = run(quantization="none")
    print(f"# greedy agreement with float32, {len(PROMPTS)} prompts x {TOKENS} tokens")
    for setting in args.settings.split(","):
        quantization, prefill = setting.split(":")
        batched, single = run(quantization=quantization, prefill_weights=prefill, native_decode=args.native_decode)
        print(
            f"{setting:>12}: batched {summary(batched, ref_batched)}; single {summary(single, ref_single)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
