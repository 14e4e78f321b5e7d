"""Embeddings per second: tricklm's /v1/embeddings against sentence-transformers' own `encode`, one machine.

One `tricklm serve --model all-MiniLM-L6-v2` (HTTP, the `openai` client's request shape), then, when the
`sentence_transformers` package can be imported (it is not a dependency: `pip install sentence-transformers`,
or point PYTHONPATH at a copy), `SentenceTransformer(folder).encode` in this process on the same texts.
Texts: the shipped prompt sets (82 texts of 60-250 tokens). Batch 1 sends one text a request, one request at
a time; batch 64 sends 64 texts a request (sentence-transformers: `batch_size=64`). Printed: texts/s of each,
best of `--rounds`.

    .venv/bin/python benchmarks/embeddings.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import time

import httpx
from api_overhead import cpu_name, free_port, start_server

from tricklm.bench.workload import load_prompt_set
from tricklm.model.resolve import resolve_model

MODEL = "all-MiniLM-L6-v2"


def texts() -> list[str]:
    return load_prompt_set("prompts") + load_prompt_set("rewrite")


def server_rate(base: str, items: list[str], batch: int) -> float:
    with httpx.Client(timeout=300) as client:
        start = time.perf_counter()
        for i in range(0, len(items), batch):
            body = {"model": MODEL, "input": items[i : i + batch], "truncate": True}
            response = client.post(f"{base}/v1/embeddings", json=body)
            response.raise_for_status()
        return len(items) / (time.perf_counter() - start)


def library_rate(items: list[str], batch: int) -> float | None:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    model = SentenceTransformer(str(resolve_model(MODEL)), device="cpu")
    model.encode(items[:8], batch_size=batch)  # warm-up
    start = time.perf_counter()
    if batch == 1:
        for text in items:
            model.encode([text], batch_size=1, normalize_embeddings=True)
    else:
        model.encode(items, batch_size=batch, normalize_embeddings=True)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    items = texts()
    print(f"CPU: {cpu_name()}, TRICKLM_ISA={os.environ.get('TRICKLM_ISA', '(auto)')}, {len(items)} texts")
    port = free_port()
    server = start_server(MODEL, port)
    base = f"http://127.0.0.1:{port}"
    try:
        server_rate(base, items[:8], 8)  # warm-up
        served = {b: max(server_rate(base, items, b) for _ in range(args.rounds)) for b in (1, 64)}
    finally:
        server.terminate()
        server.wait(timeout=60)
    library = {b: max((library_rate(items, b) or 0.0) for _ in range(args.rounds)) for b in (1, 64)}
    print("| batch | tricklm /v1/embeddings (texts/s) | sentence-transformers encode (texts/s) | ratio |")
    print("|---|---|---|---|")
    for b in (1, 64):
        lib = f"{library[b]:.1f}" if library[b] else "not installed"
        ratio = f"{served[b] / library[b]:.2f}" if library[b] else ""
        print(f"| {b} | {served[b]:.1f} | {lib} | {ratio} |")


if __name__ == "__main__":
    main()
