"""Placeholder wiring until the benchmark lands (issue 5); kept minimal and honest."""

from __future__ import annotations

import argparse


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True)


def run_bench(args: argparse.Namespace) -> int:
    raise SystemExit("tricklm bench is not implemented yet")
