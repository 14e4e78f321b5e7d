"""Which matmul kernel should hold the weights? Times every projection of one forward pass, per kernel.

For each kernel and each step size (rows = tokens in the step), this builds the model's projection
matrices with their real shapes (random values; one distinct matrix per layer, so they stream from memory
as in a real step instead of sitting in cache), then times one pass over all of them, best of `--repeats`.
The output head is timed on its own. It prints a table in milliseconds; lower is better.

Kernels (all on CPU, torch's own):
  float32        F.linear, float32 weights and activations (oneDNN / MKL)
  bfloat16       F.linear, bfloat16 weights and activations
  fbgemm-fp16    torch.ops.quantized.linear_dynamic_fp16: packed fp16 weights, float32 activations
  fp16-copy      the prefill copy `--prefill-weights fp16` keeps (quant.Fp16Weight): fbgemm fp16 over the
                 first multiple of 512 inputs (fbgemm pads the rest of a block), float32 for the remainder
  int8-wo        torch._weight_int8pack_mm: int8 weights (per channel), bfloat16 activations
  int4-wo        torch.ops.aten._weight_int4pack_mm_for_cpu: 4-bit weights, groups of 32, bfloat16
                 activations (what `--quantization int4` runs; float32 activations are 17-80x slower)
  int8-dynamic   torch.ops.quantized.linear_dynamic: int8 weights and per-tensor int8 activations (fbgemm)

The weight-only int8 kernel is only timed up to 16 rows: it is far slower than the rest beyond.

    .venv/bin/python benchmarks/linear_kernels.py                  # SmolLM2-135M shapes
    .venv/bin/python benchmarks/linear_kernels.py --rows 1,16 --repeats 3
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from tricklm.model.resolve import resolve_model
from tricklm.model.weights.loader import load_config
from tricklm.model.weights.quant import Fp16Weight

Op = Callable[[], object]
GROUP = 32  # int4 quantisation group, as in the GGUF's Q4_1 blocks
SLOW_KERNELS = ("int8-wo",)
SLOW_MAX_ROWS = 16


def projection_shapes(model_dir: Path) -> tuple[int, list[tuple[int, int]], tuple[int, int]]:
    """(layers, [(out, in)] of one layer's fused projections, (vocab, hidden) of the head)."""
    cfg = load_config(model_dir)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_layers, [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)], (cfg.vocab_size, h)


def make_op(kernel: str, n: int, k: int, rows: int) -> Op:
    w = torch.randn(n, k) / k**0.5
    x = torch.randn(rows, k)
    if kernel == "float32":
        return lambda: torch.nn.functional.linear(x, w)
    if kernel == "bfloat16":
        wb, xb = w.bfloat16(), x.bfloat16()
        return lambda: torch.nn.functional.linear(xb, wb)
    if kernel == "fbgemm-fp16":
        packed = torch.ops.quantized.linear_prepack_fp16(w, None)
        return lambda: torch.ops.quantized.linear_dynamic_fp16(x, packed)
    if kernel == "fp16-copy":
        copy = Fp16Weight(w, None)
        return lambda: copy.matmul(x)
    if kernel == "int8-wo":
        scale = w.abs().amax(dim=1) / 127
        w8 = torch.round(w / scale[:, None]).to(torch.int8)
        xb, sb = x.bfloat16(), scale.bfloat16()
        return lambda: torch._weight_int8pack_mm(xb, w8, sb)
    if kernel == "int4-wo":
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scales_and_zeros = torch.rand(k // GROUP, n, 2, dtype=torch.bfloat16)
        xb = x.bfloat16()
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, GROUP, scales_and_zeros)
    if kernel == "int8-dynamic":
        scale = (w.abs().amax(dim=1) / 127).double()
        zero = torch.zeros(n, dtype=torch.long)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated but still the fbgemm entry point
            qw = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        return lambda: torch.ops.quantized.linear_dynamic(x, packed, False)
    raise ValueError(kernel)


def best_ms(ops: list[Op], repeats: int) -> float:
    for op in ops:  # warm-up: packing, allocator, thread pool
        op()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for op in ops:
            op()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder whose shapes to use (default: SmolLM2-135M)")
    p.add_argument("--rows", default="1,4,16,64,256", help="step sizes (tokens per step)")
    p.add_argument("--kernels", default="float32,bfloat16,fbgemm-fp16,fp16-copy,int8-wo,int4-wo,int8-dynamic")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers, shapes, head = projection_shapes(resolve_model(args.model))
    kernels = args.kernels.split(",")
    print(f"# {layers} layers x {shapes} + head {head}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("# ms per forward pass, best of", args.repeats, "(projections | head)")
    print(f"{'rows':>5} " + " ".join(f"{name:>21}" for name in kernels))
    for rows in (int(r) for r in args.rows.split(",")):
        cells = []
        for kernel in kernels:
            if kernel in SLOW_KERNELS and rows > SLOW_MAX_ROWS:
                cells.append(f"{'-':>21}")
                continue
            body = best_ms([make_op(kernel, n, k, rows) for _ in range(layers) for n, k in shapes], args.repeats)
            out = best_ms([make_op(kernel, *head, rows)], args.repeats)
            cells.append(f"{body:>12.1f} | {out:>6.1f}")
        print(f"{rows:>5} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
