"""`tricklm serve | demo | bench`'s options, and the configs they make: defaults come from the config dataclasses.

Apart from the command line itself (`cli.py`), so that a replicated deployment started by Ray from `tricklm serve`'s
options (`server.replicas.from_args`) reads them without importing the command line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from tricklm.config import SPECULATIVE_MODES, EngineConfig, ReplicaPlan, ServerConfig, config_from_args
from tricklm.logs import LOG_FORMATS, LOG_LEVELS
from tricklm.model.weights.modes import PREFILL_FORMATS, QUANTIZATIONS, check_quantization
from tricklm.server.middleware.access import KEY_ENV, read_keys

_ENGINE_DEFAULTS = EngineConfig()
_SERVER_DEFAULTS = ServerConfig()


def _parse_size(text: str) -> int:
    """'512MiB', '1GiB', '300MB' or a plain byte count."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    return int(lowered)


def _quantization(value: str) -> str:
    """A `--quantization` name; a retired one is refused with what replaced it."""
    try:
        check_quantization(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _add_engine_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    d = _ENGINE_DEFAULTS
    if several:
        p.add_argument(
            "--model",
            dest="models",
            action="append",
            default=[],
            help="HF model folder, .gguf file, or a shipped model by name: SmolLM2-135M-Instruct (the default) or "
            "all-MiniLM-L6-v2 (embeddings); give it again to serve several models, each request's `model` "
            "picking one",
        )
    else:
        p.add_argument("--model", default=None, help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"])
    p.add_argument(
        "--quantization",
        default=d.quantization,
        type=_quantization,
        metavar="{" + ",".join(QUANTIZATIONS) + "}",
        help="auto (default): gguf for a .gguf file, int4 for a safetensors folder; gguf: one copy of the "
        "file's own types (4- or 8-bit blocks) for every step, int8 kernels; q4_0, q4_1, q4_k, q8_0: one copy "
        "rounded to that format at load as llama.cpp's quantize does (GGUF types that fit are kept as they are; "
        "q4_k takes q5_0 where inputs are not a multiple of 256); int4: 4-bit weights for decode where the "
        "checkpoint's are 4-bit already (fp16 elsewhere) plus a copy for prefill (--prefill-weights); "
        "fp16-only: fp16 weights for every step; none: all in --dtype",
    )
    p.add_argument(
        "--prefill-weights",
        default=d.prefill_weights,
        choices=PREFILL_FORMATS,
        help="format of the weight copy prefill steps read with int4: bf16 or fp16, whichever kernel "
        "this CPU runs faster (auto, the default: timed at load)",
    )
    p.add_argument("--max-model-len", type=int, default=d.max_model_len, help="context window (default: model's)")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="requests decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens, help="tokens per step")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before 429")
    p.add_argument("--kv-cache-memory", type=_parse_size, default=None, help="KV cache budget, e.g. 512MiB")
    p.add_argument(
        "--num-threads", type=int, default=d.num_threads, help="torch threads for large steps (default: all cores)"
    )
    p.add_argument(
        "--decode-threads",
        type=int,
        default=d.decode_threads,
        help="torch threads for decode steps (default: as --num-threads; 1 while other processes are busy)",
    )
    p.add_argument(
        "--native-decode",
        action=argparse.BooleanOptionalAction,
        default=d.native_decode,
        help="run decode steps of Llama-family models with compact weights in C++ (compiled on first use; default: on)",
    )
    p.add_argument(
        "--prefix-caching",
        dest="enable_prefix_caching",
        action=argparse.BooleanOptionalAction,
        default=d.enable_prefix_caching,
        help="reuse the KV cache of a prompt's longest already-computed prefix (default: on)",
    )
    p.add_argument(
        "--speculative",
        choices=SPECULATIVE_MODES,
        default=d.speculative,
        help="ngram: a decoding request drafts tokens from its own prompt and output (prompt lookup), verified "
        "in the next step; several tokens a step where the text repeats its input (default: none)",
    )
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=d.num_speculative_tokens,
        help="the longest draft, in tokens (default: %(default)s; each request adapts its own below it)",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The (first) model's engine config; `serve`'s other models take it with their own `model`."""
    if hasattr(args, "models"):
        return config_from_args(EngineConfig, args, model=args.models[0] if args.models else None)
    return config_from_args(EngineConfig, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tricklm", description="A streaming LLM server for CPUs.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible + /generate)")
    _add_engine_args(serve, several=True)
    serve.add_argument("--host", default=_SERVER_DEFAULTS.host)
    serve.add_argument("--port", type=int, default=_SERVER_DEFAULTS.port)
    serve.add_argument(
        "--served-model-name",
        dest="served_model_names",
        action="append",
        default=[],
        help="model id shown by /v1/models and matched against requests' `model`; once per --model, in order",
    )
    serve.add_argument(
        "--memory-limit",
        type=_parse_size,
        default=None,
        help="refuse to start when the models' weights and KV budgets together exceed this, e.g. 8GiB",
    )
    serve.add_argument("--log-level", default=_SERVER_DEFAULTS.log_level, choices=LOG_LEVELS)
    serve.add_argument(
        "--log-format", default=_SERVER_DEFAULTS.log_format, choices=LOG_FORMATS, help="json: one object per line"
    )
    serve.add_argument(
        "--log-requests", action="store_true", help="put prompt and output text in the access lines (default: never)"
    )
    serve.add_argument(
        "--stats-interval",
        type=float,
        default=_SERVER_DEFAULTS.stats_interval,
        help="seconds between stats lines (running, waiting, KV usage, tok/s); 0 turns them off (default: 10)",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=_parse_size,
        default=_SERVER_DEFAULTS.max_request_bytes,
        help="larger request bodies are refused with 413 before parsing (default: 2MiB)",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="require 'Authorization: Bearer KEY' on every route but /health and the chat page (repeatable; "
        f"also --api-key-file, {KEY_ENV})",
    )
    serve.add_argument("--api-key-file", type=Path, default=None, help="API keys, one per line")
    serve.add_argument(
        "--allowed-origins",
        default="",
        help="CORS: comma-separated origins allowed to call from a browser, or * (default: same-origin only)",
    )
    serve.add_argument("--metrics-public", action="store_true", help="serve /metrics without an API key")
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds a request may run; longer ones end with an error and free their slot (default: none)",
    )
    serve.add_argument(
        "--reasoning-format",
        choices=("auto", "none"),
        default=_SERVER_DEFAULTS.reasoning_format,
        help="a thinking model's reasoning: 'auto' returns it as reasoning_content, apart from the answer; "
        "'none' leaves it in the content (default: auto)",
    )
    serve.add_argument(
        "--reasoning-budget",
        type=int,
        default=None,
        help="reasoning tokens a reply may spend before its thinking is closed and the answer follows; 0 "
        "turns thinking off where the template can (default: no limit; a request's reasoning_budget wins)",
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=_SERVER_DEFAULTS.header_timeout,
        help="seconds a request's headers may take to arrive (slow clients get 408; default: 20)",
    )
    serve.add_argument(
        "--body-timeout",
        type=float,
        default=_SERVER_DEFAULTS.body_timeout,
        help="seconds a request's body may take to arrive (slow clients get 408; default: 60)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=_SERVER_DEFAULTS.shutdown_timeout,
        help="on SIGTERM, seconds requests in flight may take to finish before they end with an error "
        "(a second signal exits at once; default: 25)",
    )
    serve.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="run N engine replicas on Ray Serve behind one endpoint (needs tricklm[ray]; default: one engine, no Ray)",
    )
    serve.add_argument(
        "--ray-address", default=None, help="with --replicas: join this Ray cluster (default: start a local Ray)"
    )
    serve.add_argument(
        "--cpus-per-replica",
        type=int,
        default=None,
        help="with --replicas: CPUs each replica reserves and runs its engine on (default: --num-threads, or "
        "this machine's cores / N)",
    )
    demo = sub.add_parser("demo", help="stream a prompt to the terminal and compare streaming with non-streaming")
    _add_engine_args(demo)
    demo.add_argument("--prompt", default="Once upon a time, in a small village by the sea,")
    demo.add_argument("--max-tokens", type=int, default=64)
    from tricklm.bench.cli import add_bench_args

    add_bench_args(sub.add_parser("bench", help="benchmark any OpenAI-compatible server"))
    return parser


def server_config(args: argparse.Namespace) -> ServerConfig:
    keys = read_keys(args.api_key, args.api_key_file)
    origins = tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    models = tuple(args.models[1:]) if getattr(args, "models", None) else ()
    names = tuple(args.served_model_names)
    if len(names) > 1 + len(models):
        raise ValueError(f"{len(names)} --served-model-name for {1 + len(models)} --model")
    if len(set(names)) < len(names):
        raise ValueError("each --served-model-name must be different")
    return config_from_args(
        ServerConfig, args, api_keys=keys, allowed_origins=origins, served_model_names=names, models=models
    )


def replica_setup(argv: Sequence[str]) -> tuple[EngineConfig, ServerConfig, ReplicaPlan]:
    """`tricklm serve` options (`--replicas N ...`) as the configs of a replicated deployment."""
    return replica_plan(build_parser().parse_args(["serve", *argv]))


def replica_plan(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig, ReplicaPlan]:
    if args.replicas < 1:
        raise ValueError("--replicas must be at least 1")
    if len(args.models) > 1:
        raise ValueError("--replicas serves one model: give --model once")
    cpus = args.cpus_per_replica or args.num_threads or max(1, (os.cpu_count() or 1) // args.replicas)
    if cpus < 1:
        raise ValueError("--cpus-per-replica must be at least 1")
    return engine_config(args), server_config(args), ReplicaPlan(args.replicas, cpus, args.ray_address)
