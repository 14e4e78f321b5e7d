"""Every llama.cpp weight format of the default model, judged by KL divergence against float32.

Writes the default model's weights as an F32 GGUF (the shipped Q4_1 file dequantized: the float32
reference tricklm's `none` runs), has llama.cpp's own `llama-quantize` make one file per type from it,
prints which tensor types each file holds (llama.cpp falls back to another type where a tensor's rows
are not a multiple of 256, as most of SmolLM2-135M's are: 576 inputs), then runs `benchmarks/kld.py`
with the F32 file as reference and each file, served as tricklm serves it by default (`auto`: the
file's own types in one copy of blocks), as a candidate.

With `--llama-perplexity`, llama.cpp's own `llama-perplexity --kl-divergence` then scores the same files
on the same text (40 chunks of 512 tokens, second halves), so each type's figure can be set beside
llama.cpp's: a type read wrongly would stand out.

llama-quantize and llama-perplexity are never tricklm dependencies: build them beside llama-server
(benchmarks/README.md) and pass their paths.

    .venv/bin/python benchmarks/gguf_formats.py --llama-quantize PATH/llama-quantize \
        --llama-perplexity PATH/llama-perplexity
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

from tricklm.model.resolve import default_gguf_path

BENCH_DIR = Path(__file__).resolve().parent
TYPES = "Q8_0,Q6_K,Q5_K_M,Q5_1,Q5_0,Q4_K_M,Q4_K_S,Q4_1,Q4_0"
SKIPPED_KEYS = ("GGUF.", "general.architecture", "general.file_type")  # the writer sets these itself


def write_f32(source: Path, out: Path) -> None:
    """`source`'s metadata and every tensor, dequantized to F32, in the file's own layout and order."""
    reader = GGUFReader(str(source))
    writer = GGUFWriter(str(out), "llama")
    for key, field in reader.fields.items():
        if key.startswith(SKIPPED_KEYS):
            continue
        value: Any = field.contents()
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        rows = int(t.shape[-1]) if len(t.shape) == 2 else 1
        values = np.asarray(dequantize(np.asarray(t.data).reshape(rows, -1), t.tensor_type), dtype=np.float32)
        writer.add_tensor(t.name, values.reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def type_mix(path: Path) -> str:
    counts = collections.Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors if len(t.shape) == 2)
    return ", ".join(f"{n} {kind}" for kind, n in counts.most_common())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-quantize", type=Path, default=os.environ.get("TRICKLM_LLAMA_QUANTIZE"))
    p.add_argument("--types", default=TYPES, help="llama-quantize type names, comma-separated")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/tricklm-formats"))
    p.add_argument("--llama-perplexity", type=Path, default=os.environ.get("TRICKLM_LLAMA_PERPLEXITY"))
    p.add_argument("--tokens", type=int, default=20480)
    args = p.parse_args()
    if args.llama_quantize is None or not args.llama_quantize.is_file():
        p.error("give --llama-quantize PATH (or TRICKLM_LLAMA_QUANTIZE): llama.cpp's quantize tool")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    f32 = args.work_dir / "model-F32.gguf"
    if not f32.is_file():
        write_f32(default_gguf_path(), f32)
    files = []
    for kind in args.types.split(","):
        out = args.work_dir / f"model-{kind}.gguf"
        if not out.is_file():
            cmd = [str(args.llama_quantize), str(f32), str(out), kind, "2"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0:
                print(f"# {kind}: llama-quantize failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
        files.append(out)
        print(f"# {kind}: {out.stat().st_size / 2**20:.1f} MiB; matrices: {type_mix(out)}", flush=True)
    kld = [sys.executable, str(BENCH_DIR / "kld.py"), "--tokens", str(args.tokens), "--reference", f"none@{f32}"]
    kld += ["--candidates", ",".join(f"auto@{f}" for f in files)]
    print("# " + " ".join(kld[1:]), flush=True)
    code = subprocess.run(kld, check=False).returncode
    if args.llama_perplexity is not None:
        llama_cpp_kld(args.llama_perplexity, f32, files, args.work_dir, args.tokens // CTX)
    return code


CTX = 512


def llama_cpp_kld(tool: Path, f32: Path, files: list[Path], work: Path, chunks: int) -> None:
    """llama-perplexity's KL divergence of each file from the F32 one, on kld.py's text."""
    sys.path.insert(0, str(BENCH_DIR))
    from kld import stdlib_prose

    text = work / "prose.txt"
    text.write_text(stdlib_prose(), encoding="utf-8")
    common = ["-f", str(text), "-c", str(CTX), "--chunks", str(chunks), "-t", "2", "-b", str(CTX)]
    base = work / "f32.kld"
    subprocess.run(
        [str(tool), "-m", str(f32), *common, "--kl-divergence-base", str(base)], capture_output=True, check=True
    )
    for f in files:
        cmd = [str(tool), "-m", str(f), *common, "--kl-divergence-base", str(base), "--kl-divergence"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        keep = ("Mean    KLD", "Same top p", "Mean PPL(Q)/PPL(base)", "chunks")
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip().startswith(keep)]
        print(f"llama.cpp {f.name} vs {f32.name}: " + " | ".join(lines), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
