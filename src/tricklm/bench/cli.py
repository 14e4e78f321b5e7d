"""`tricklm bench`: arguments (defaults from `BenchConfig`) and the run → table, JSON and charts.

Exit status: 0 when at least one measured request completed, 1 when every one failed, 2 when the
benchmark could not start (bad arguments, server unreachable).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tricklm.bench.client import BenchError
from tricklm.bench.report import format_report, write_json
from tricklm.bench.runner import DATASETS, ENDPOINTS, BenchConfig, Benchmark, run_benchmark
from tricklm.config import config_from_args

_D = BenchConfig(base_url="")


def _concurrency_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.description = "Measure TTFT, TPOT, ITL, E2E latency and throughput of any OpenAI-compatible server."
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    p.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    p.add_argument(
        "--endpoint",
        choices=ENDPOINTS,
        default=_D.endpoint,
        help="/v1/completions, /v1/chat/completions, /v1/messages (Anthropic's), /v1/responses, /v1/embeddings "
        "or /v1/rerank (%(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=_D.batch_size,
        help="embeddings and rerank: texts (documents) a request (%(default)s)",
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=_D.dataset,
        help="random words, a shipped prompt set (prompts: free-form; rewrite: rewrite, summarize or fix a given "
        "text or code), or chats resending their history (%(default)s)",
    )
    p.add_argument(
        "--num-prompts",
        type=int,
        default=_D.num_prompts,
        help="measured requests per run; conversations with --dataset multi-turn (%(default)s)",
    )
    p.add_argument("--turns", type=int, default=_D.turns, help="multi-turn: user turns per conversation (%(default)s)")
    p.add_argument(
        "--system-prompt-len",
        type=int,
        default=_D.system_prompt_len,
        help="multi-turn: tokens of a system prompt shared by every conversation (%(default)s)",
    )
    p.add_argument("--input-len", type=int, default=_D.input_len, help="prompt tokens, random dataset (%(default)s)")
    p.add_argument(
        "--input-len-spread", type=float, default=_D.input_len_spread, help="± fraction of --input-len (%(default)s)"
    )
    p.add_argument("--output-len", type=int, default=_D.output_len, help="max_tokens of every request (%(default)s)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--max-concurrency", type=int, default=None, help="closed loop: N requests in flight")
    load.add_argument("--sweep", type=_concurrency_list, default=(), help="run each concurrency in turn, e.g. 1,2,4,8")
    p.add_argument(
        "--request-rate",
        type=float,
        default=_D.request_rate,
        help="open loop: Poisson arrivals per s (%(default)s: all at once)",
    )
    p.add_argument("--warmup", type=int, default=_D.warmup, help="requests sent first and not measured (%(default)s)")
    p.add_argument("--seed", type=int, default=_D.seed, help="for prompts and arrivals (%(default)s)")
    p.add_argument(
        "--timeout", type=float, default=_D.timeout, help="seconds before a request counts as failed (%(default)s)"
    )
    p.add_argument("--temperature", type=float, default=_D.temperature, help="sampling temperature (%(default)s)")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (servers that reject it)")
    p.add_argument(
        "--response-format",
        default=_D.response_format,
        choices=["text", "json_object"],
        help="structured outputs: every request asks for a JSON object (%(default)s)",
    )
    p.add_argument("--json-schema", type=Path, default=None, help="every request asks for JSON valid against FILE")
    p.add_argument("--no-calibrate", action="store_true", help="do not ask POST /tokenize for tokens per word")
    p.add_argument(
        "--health-path", default=_D.health_path, help="probed every 100 ms during runs (%(default)s); '' disables"
    )
    p.add_argument("--json-out", type=Path, default=None, help="write config, summaries and per-request figures")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write PNG charts into DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def bench_config(args: argparse.Namespace) -> BenchConfig:
    return config_from_args(BenchConfig, args, ignore_eos=not args.no_ignore_eos, calibrate=not args.no_calibrate)


def run_bench(args: argparse.Namespace) -> int:
    config = bench_config(args)
    try:
        bench = asyncio.run(run_benchmark(config, progress=not args.no_progress))
    except BenchError as e:
        print(f"tricklm bench: error: {e}", file=sys.stderr)
        return 2
    print(format_report(bench), flush=True)
    _write_outputs(bench, args.json_out, args.plot)
    return 0 if any(run.summary.completed for run in bench.runs) else 1


def _write_outputs(bench: Benchmark, json_out: Path | None, plot_dir: Path | None) -> None:
    if json_out is not None:
        write_json(bench, json_out)
        print(f"wrote {json_out}", file=sys.stderr)
    if plot_dir is not None:
        from tricklm.bench.plots import plot_benchmark  # matplotlib is slow to import; only when asked

        for path in plot_benchmark(bench, plot_dir):
            print(f"wrote {path}", file=sys.stderr)
