"""The one-copy block kernels (4- and 8-bit levels) against fbgemm's packed fp16, one projection at a time.

Random weights in blocks (4-bit levels as Q4_1's, 8-bit as Q8_0's) of the shapes of SmolLM2-135M's and
SmolLM2-1.7B's projections; best of 20 calls at 1, 16 and 256 rows, for each kernel this CPU runs
(`qlinear.load_qmatmul().isa()`, and the AMX path where the CPU has it), with torch's threads as
configured (all cores by default).

    .venv/bin/python benchmarks/block_kernel.py
    .venv/bin/python benchmarks/block_kernel.py --bits 4 --no-fp16
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from tricklm.model.weights.qlinear import QWeight, load_qmatmul, qmatmul
from tricklm.model.weights.quant import Fp16Weight

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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="4,8")
    p.add_argument("--no-fp16", action="store_true", help="skip fbgemm's packed fp16")
    args = p.parse_args()
    ext = load_qmatmul()
    isas = ([ext.isa()] + (["avx2"] if ext.isa() == "avx512vnni" else [])) if ext is not None else ["torch"]
    if ext is not None and ext.amx():  # forced at every row count, to show where it starts to pay
        isas.append("amx")
    print(f"# {torch.get_num_threads()} threads; kernels: {', '.join(isas)}; ms, best of 20")
    gen = torch.Generator().manual_seed(0)
    for bits in (int(b) for b in args.bits.split(",")):
        for n, k in SHAPES:
            levels = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
            d = torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3
            weight = QWeight.from_blocks(levels, d, -(1 << (bits - 1)) * d)
            fp16 = None if args.no_fp16 else Fp16Weight(weight.dequantize(), None)
            for rows in ROWS:
                x = torch.randn(rows, k, generator=gen)
                times = {isa: best_ms(_blocks(x, weight, isa)) for isa in isas}
                if fp16 is not None:
                    times["fbgemm fp16"] = best_ms(_fp16(x, fp16))
                shown = ", ".join(f"{name} {ms:.2f}" for name, ms in times.items())
                print(f"{bits}-bit {n}x{k} at {rows:>3} rows: {shown}", flush=True)


def _blocks(x: torch.Tensor, weight: QWeight, isa: str) -> Callable[[], object]:
    return lambda: qmatmul(x, weight, isa)


def _fp16(x: torch.Tensor, weight: Fp16Weight) -> Callable[[], object]:
    return lambda: weight.matmul(x)


if __name__ == "__main__":
    main()
