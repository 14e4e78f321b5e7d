"""Random-weight GGUF files of real model shapes, for speed and memory measurements at real sizes.

Timing and memory do not depend on the weights' values, so a file of random 4-bit blocks in a real
model's shape measures what that model would cost, without downloading it. The tokenizer and chat
template are the shipped default model's (SmolLM2's 49,152-token vocabulary; shapes with another
vocabulary take this one). Written with the `gguf` package's writer, like llama.cpp's converter.

    .venv/bin/python benchmarks/random_gguf.py --shape smollm2-1.7b --out /tmp/smollm2-1.7b-q4_1.gguf
    .venv/bin/python benchmarks/random_gguf.py --shape llama-3.2-1b --type Q4_0 --out /tmp/llama1b.gguf

K-quant files (Q4_K_M, what people download) are made from a Q8_0 one by llama.cpp's own quantizer, as
people make them (`benchmarks/build_llama_cpp.sh` builds it):

    .venv/bin/python benchmarks/random_gguf.py --shape llama-3-8b --type Q8_0 --out /tmp/8b-q8_0.gguf
    benchmarks/.llama.cpp/avx2/bin/llama-quantize --allow-requantize /tmp/8b-q8_0.gguf /tmp/8b-q4_k_m.gguf Q4_K_M
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape

from tricklm.model.resolve import default_gguf_path

# hidden, layers, heads, kv heads, intermediate, context (vocabulary: the shipped tokenizer's)
SHAPES = {
    "smollm2-360m": (960, 32, 15, 5, 2560, 8192),
    "smollm2-1.7b": (2048, 24, 32, 32, 8192, 8192),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 8192),
    "llama-3-8b": (4096, 32, 32, 8, 14336, 8192),
}
UNTIED = ("llama-3-8b",)  # shapes with an output head of their own (the others tie it to the token table)
COPIED_KEYS = ("tokenizer.", "llama.vocab_size", "llama.rope.freq_base")


def random_blocks(rows: int, cols: int, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Random bytes in the type's block layout, with plausible fp16 scales (small, positive)."""
    raw = rng.integers(0, 256, size=quant_shape_to_byte_shape((rows, cols), qtype), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, {GGMLQuantizationType.Q4_1: 20, GGMLQuantizationType.Q4_0: 18,
                                    GGMLQuantizationType.Q8_0: 34}[qtype])  # fmt: skip
    scale = rng.uniform(0.001, 0.01, size=blocks.shape[:2]).astype(np.float16)
    blocks[..., :2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
    if qtype == GGMLQuantizationType.Q4_1:
        blocks[..., 2:4] = (-8 * scale).view(np.uint8).reshape(*blocks.shape[:2], 2)
    return raw


def copy_tokenizer(writer: GGUFWriter, source: GGUFReader) -> None:
    for key, field in source.fields.items():
        if not key.startswith(COPIED_KEYS):
            continue
        types = field.types
        value: Any = field.contents()
        sub = types[1] if types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, types[0], sub_type=sub)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--type", default="Q4_1", choices=["Q4_0", "Q4_1", "Q8_0"], help="the projections' type")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    hidden, layers, heads, kv_heads, inter, ctx = SHAPES[args.shape]
    source = GGUFReader(str(default_gguf_path()))
    vocab = int(source.fields["llama.vocab_size"].contents())
    qtype = GGMLQuantizationType[args.type]
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(args.out), "llama")
    writer.add_name(f"random {args.shape}")
    writer.add_block_count(layers)
    writer.add_context_length(ctx)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    copy_tokenizer(writer, source)
    q8 = GGMLQuantizationType.Q8_0
    writer.add_tensor("token_embd.weight", random_blocks(vocab, hidden, q8, rng), raw_dtype=q8)
    if args.shape in UNTIED:
        writer.add_tensor("output.weight", random_blocks(vocab, hidden, q8, rng), raw_dtype=q8)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    head_dim = hidden // heads
    shapes = {
        "attn_q": (hidden, hidden), "attn_k": (kv_heads * head_dim, hidden), "attn_v": (kv_heads * head_dim, hidden),
        "attn_output": (hidden, hidden), "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden),
        "ffn_down": (hidden, inter),
    }  # fmt: skip
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        for name, (rows, cols) in shapes.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", random_blocks(rows, cols, qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    print(f"{args.out}: {args.out.stat().st_size / 2**30:.2f} GiB, {args.shape} in {args.type}")


if __name__ == "__main__":
    main()
