"""The one-copy 4-bit kernel against fbgemm's packed fp16, one projection at a time (issue 14).

Random Q4_1 weights of the shapes of SmolLM2-135M's and SmolLM2-1.7B's projections; best of 20 calls
at 1, 16 and 256 rows, for each kernel this CPU runs (`qlinear.load_qmatmul().isa()`), with torch's
threads as configured (all cores by default).

    .venv/bin/python benchmarks/q4_kernel.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from tricklm.model.qlinear import QWeight, load_qmatmul, qmatmul
from tricklm.model.quant import Fp16Weight

SHAPES = [(3072, 576), (576, 1536), (8192, 2048), (2048, 8192)]
ROWS = (1, 16, 256)


def best_ms(op: Callable[[], object], repeats: int = 20) -> float:
    op()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        op()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    ext = load_qmatmul()
    isas = ([ext.isa()] + (["avx2"] if ext.isa() == "avx512vnni" else [])) if ext is not None else ["torch"]
    print(f"# {torch.get_num_threads()} threads; kernels: {', '.join(isas)}; ms, best of 20")
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        levels = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        d = torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3
        weight = QWeight.from_blocks(levels, d, -8 * d)
        fp16 = Fp16Weight(weight.dequantize(), None)
        for rows in ROWS:
            x = torch.randn(rows, k, generator=gen)
            times = {isa: best_ms(_q4(x, weight, isa)) for isa in isas}
            times["fbgemm fp16"] = best_ms(_fp16(x, fp16))
            print(f"{n}x{k} at {rows:>3} rows: " + ", ".join(f"{name} {ms:.2f}" for name, ms in times.items()))


def _q4(x: torch.Tensor, weight: QWeight, isa: str) -> Callable[[], object]:
    return lambda: qmatmul(x, weight, isa)


def _fp16(x: torch.Tensor, weight: Fp16Weight) -> Callable[[], object]:
    return lambda: weight.matmul(x)


if __name__ == "__main__":
    main()
