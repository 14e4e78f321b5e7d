"""The sampler's cost per step at temperature > 0: `sample()` as the engine calls it, against the
per-row `torch.multinomial` it replaced, for 1, 4 and 16 rows of the default model's vocabulary.

    .venv/bin/python benchmarks/sampler.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from busy_machine import cpu_name

from tricklm.engine.request import Request
from tricklm.engine.sampler import sample
from tricklm.engine.sampling_params import SamplingParams

VOCAB = 49152  # SmolLM2's


def multinomial_rows(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """What `_draw` did before: softmax, then one torch.multinomial per row with the row's generator."""
    temps = torch.tensor([r.params.temperature for r in requests]).unsqueeze(1)
    probs = torch.softmax(logits / temps, dim=-1)
    return [int(torch.multinomial(probs[i], 1, generator=r.generator).item()) for i, r in enumerate(requests)]


def median_ms(fn: Callable[[], object], repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    print(f"CPU: {cpu_name()}; vocabulary {VOCAB}; temperature 0.8; torch threads {torch.get_num_threads()}")
    for rows in (1, 4, 16):
        logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(rows)) * 4
        requests = [Request(f"r{i}", [1], SamplingParams(temperature=0.8, seed=i), 8) for i in range(rows)]
        ours = median_ms(lambda: sample(logits, requests), 200)  # noqa: B023 - used within the iteration
        before = median_ms(lambda: multinomial_rows(logits, requests), 200)  # noqa: B023
        print(f"{rows:>2} rows: sample() {ours:6.2f} ms, per-row multinomial {before:6.2f} ms ({before / ours:.1f}x)")


if __name__ == "__main__":
    main()
