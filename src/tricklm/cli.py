"""`tricklm serve | demo | bench` (options: `options.py`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tricklm.logs import configure_logging
from tricklm.model.config import ModelLoadError
from tricklm.options import build_parser, engine_config, replica_plan, server_config


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_format", "text"), getattr(args, "log_level", "info"))
    try:
        if args.command == "serve" and args.replicas:
            return _serve_replicas(args)
        if args.command == "serve":
            from tricklm.server.run import serve

            return serve(engine_config(args), server_config(args))
        if args.command == "demo":
            from tricklm.demo import run_demo

            return run_demo(engine_config(args), args.prompt, args.max_tokens)
        from tricklm.bench.cli import run_bench

        return run_bench(args)
    except (ModelLoadError, ValueError) as e:
        print(f"tricklm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve_replicas(args: argparse.Namespace) -> int:
    try:
        from tricklm.server.replicas.gateway import serve_replicas
    except ImportError as e:
        raise ValueError(f"--replicas needs Ray Serve ({e}): pip install 'tricklm[ray]'") from None
    return serve_replicas(*replica_plan(args))
