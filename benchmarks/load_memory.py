"""Start-up time and memory of loading a model: what a user waits for and what the machine must hold.

Loads `--model` (default: the shipped model) with each `--quantization` in a fresh process, and prints
the seconds until the engine is ready, the peak resident memory during the load (`ru_maxrss`), and the
resident memory once loaded. The first start of a GGUF file also writes its config and tokenizer to
the cache (once); run twice to see later starts.

    .venv/bin/python benchmarks/load_memory.py --model /tmp/smollm2-1.7b-q4_1.gguf --quantization gguf,int4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(model: str | None, quantization: str, kv_mib: int) -> dict[str, float]:
    """In this process: load, then report (run by `main` in a child per setting)."""
    from tricklm.engine.llm import LLM

    start = time.monotonic()
    llm = LLM(model=model, quantization=quantization, kv_cache_memory=kv_mib * 2**20)
    seconds = time.monotonic() - start
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * resource.getpagesize()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    llm.shutdown()
    return {"seconds": seconds, "peak_gb": peak / 1e9, "rss_gb": rss / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--quantization", default="gguf,int4")
    p.add_argument("--kv-cache-memory-mib", type=int, default=512)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.quantization, args.kv_cache_memory_mib)))
        return
    print(f"# model {args.model or 'default'}, KV cache budget {args.kv_cache_memory_mib} MiB")
    for q in args.quantization.split(","):
        cmd = [sys.executable, __file__, "--child", "--quantization", q, "--kv-cache-memory-mib"]
        cmd += [str(args.kv_cache_memory_mib), *(["--model", args.model] if args.model else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        ready, peak, rss = r["seconds"], r["peak_gb"], r["rss_gb"]
        print(f"{q:>10}: ready in {ready:.1f} s, peak RSS {peak:.2f} GB, RSS after load {rss:.2f} GB")


if __name__ == "__main__":
    main()
