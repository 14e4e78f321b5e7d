"""Reporting a benchmark: a readable table for the terminal and a JSON document with every figure.

JSON layout: `{"tool", "version", "created", "config", "tokens_per_word", "runs": [run, ...]}` with one run
per load level, each `{"max_concurrency", "request_rate", "duration_s", "summary", "requests", "health"}`.
Latencies are in milliseconds, `start_s`/`t_s` in seconds from the run's start; an infinite request rate is
written as the string "inf" (JSON has no infinity).
"""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tricklm import __version__
from tricklm.bench.client import ENCODER_ENDPOINTS, ENDPOINT_PATHS
from tricklm.bench.metrics import RequestRecord, Stats, Summary, e2el, itls, tpot, ttft
from tricklm.bench.runner import Benchmark, RunResult

_STAT_COLUMNS = ("count", "mean", "p50", "p90", "p99", "max")


# ---- tables --------------------------------------------------------------------------------------


def level_label(run: RunResult) -> str:
    if run.max_concurrency is not None and math.isinf(run.request_rate):
        return f"max concurrency {run.max_concurrency}"
    rate = f"request rate {run.request_rate:g}/s (Poisson)" if not math.isinf(run.request_rate) else "all at once"
    return rate if run.max_concurrency is None else f"{rate}, max concurrency {run.max_concurrency}"


def format_header(bench: Benchmark) -> str:
    c = bench.config
    workload = f"random ~{c.input_len} tokens" if c.dataset == "random" else "shipped prompt set"
    if c.dataset == "random" and c.input_len_spread:
        workload += f" ±{c.input_len_spread:.0%}"
    if c.dataset == "multi-turn":
        system = f", a shared {c.system_prompt_len}-token system prompt" if c.system_prompt_len else ""
        workload = f"conversations of {c.turns} turns of ~{c.input_len} tokens{system}"
    eos = "ignore_eos" if c.ignore_eos else "stops at EOS"
    if c.endpoint in ENCODER_ENDPOINTS:
        what = "texts" if c.endpoint == "embeddings" else "documents to rank"
        load = f"workload {c.num_prompts} requests of {c.batch_size} {what} ({workload}), {c.warmup} warm-up"
    else:
        load = (
            f"workload {c.num_prompts} prompts ({workload}), {c.output_len} output tokens ({eos}), {c.warmup} warm-up"
        )
    return "\n".join([f"server   {c.base_url}{ENDPOINT_PATHS[c.endpoint]}   model {c.model}", load])


def _encoder(bench: Benchmark) -> bool:
    return bench.config.endpoint in ENCODER_ENDPOINTS


def format_run(run: RunResult, output_len: int, encoder: bool = False) -> str:
    """One run's table: an embeddings or rerank run's (`encoder`) has no tokens streaming out."""
    s = run.summary
    if encoder:
        return _encoder_run(run)
    lines = [
        f"load       {level_label(run)}",
        f"requests   {s.completed} completed, {s.failed} failed{_error_breakdown(s)}",
        f"duration   {s.duration_s:.2f} s",
        f"throughput {s.request_throughput:.2f} req/s, {s.output_throughput:.1f} output tok/s",
        f"tokens     {_token_line(s, output_len)}",
        "",
        f"{'(ms)':<12}" + "".join(f"{name:>10}" for name in _STAT_COLUMNS),
    ]
    rows = [("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms), ("E2EL", s.e2el_ms)]
    lines += [_stats_row(name, st) for name, st in rows]
    lines.append(_health_line(run))
    lines += _turn_lines(run)
    if run.speculation is not None and run.speculation[0] > 0:
        drafted, kept = run.speculation
        lines.append(f"speculative {kept:.0f} of {drafted:.0f} draft tokens kept ({kept / drafted:.1%} acceptance)")
    return "\n".join(lines)


def _encoder_run(run: RunResult) -> str:
    """An embeddings or rerank run: inputs a second and whole-request latency (nothing streams)."""
    s = run.summary
    reported = s.total_input_tokens and s.total_inputs
    tokens = (
        f", {s.total_input_tokens / s.total_inputs:.1f} input tokens a text (as the server counts)" if reported else ""
    )
    lines = [
        f"load       {level_label(run)}",
        f"requests   {s.completed} completed, {s.failed} failed{_error_breakdown(s)}",
        f"duration   {s.duration_s:.2f} s",
        f"throughput {s.request_throughput:.2f} req/s, {s.input_throughput:.1f} texts/s{tokens}",
        "",
        f"{'(ms)':<12}" + "".join(f"{name:>10}" for name in _STAT_COLUMNS),
        _stats_row("latency", s.e2el_ms),
        _health_line(run),
    ]
    return "\n".join(lines)


def _turn_lines(run: RunResult) -> list[str]:
    """For conversations: TTFT by turn, and how much of the prompts the server reported as cached."""
    by_turn: dict[int, list[float]] = {}
    for r in run.records:
        if r.turn is not None and r.is_ok and (t := ttft(r)) is not None:
            by_turn.setdefault(r.turn, []).append(t * 1000)
    if not by_turn:
        return []
    cells = [f"{turn}: {sorted(v)[len(v) // 2]:.0f}" for turn, v in sorted(by_turn.items())]
    lines = ["", "TTFT p50 by turn (ms)   " + "   ".join(cells)]
    reported = [r for r in run.records if r.cached_tokens is not None and r.prompt_tokens]
    if reported:
        cached = sum(r.cached_tokens or 0 for r in reported) / sum(r.prompt_tokens or 0 for r in reported)
        lines.append(f"prompt tokens the server reported cached: {cached:.0%}")
    return lines


def _error_breakdown(s: Summary) -> str:
    if not s.errors:
        return ""
    return " (" + ", ".join(f"{kind}: {n}" for kind, n in sorted(s.errors.items())) + ")"


def _token_line(s: Summary, output_len: int) -> str:
    mean_out = s.total_output_tokens / s.completed if s.completed else 0.0
    mean_in = s.total_input_tokens / s.completed if s.completed else 0.0
    inputs = f"input mean {mean_in:.1f}" if s.total_input_tokens else "input not reported by the server"
    return f"{inputs}, output mean {mean_out:.1f} (asked for {output_len})"


def _stats_row(name: str, st: Stats) -> str:
    cells = [f"{st.count:>10}"] + [_cell(getattr(st, col)) for col in _STAT_COLUMNS[1:]]
    return f"{name:<12}" + "".join(cells)


def _cell(value: float | None) -> str:
    return f"{'-':>10}" if value is None else f"{value:>10.1f}"


def _health_line(run: RunResult) -> str:
    s = run.summary
    if not run.is_health_supported:
        return "/health     not served (404), not probed"
    if not s.health_probes:
        return "/health     not probed"
    return _stats_row("/health", s.health_ms) + f"   ({s.health_failed} of {s.health_probes} probes failed)"


_SWEEP_COLUMNS = (  # name, width, decimals
    ("conc", 6, 0),
    ("ok", 6, 0),
    ("fail", 6, 0),
    ("req/s", 8, 2),
    ("out tok/s", 11, 1),
    ("TTFT p50", 10, 1),
    ("TTFT p99", 10, 1),
    ("TPOT p50", 10, 1),
    ("ITL p50", 10, 1),
    ("E2EL p50", 10, 1),
    ("health p99", 12, 1),
)


_ENCODER_SWEEP_COLUMNS = (
    ("conc", 6, 0),
    ("ok", 6, 0),
    ("fail", 6, 0),
    ("req/s", 8, 2),
    ("texts/s", 10, 1),
    ("lat p50", 10, 1),
    ("lat p99", 10, 1),
    ("health p99", 12, 1),
)


def format_sweep(runs: list[RunResult], encoder: bool = False) -> str:
    """One row per load level; latencies in ms."""
    columns = _ENCODER_SWEEP_COLUMNS if encoder else _SWEEP_COLUMNS
    lines = ["".join(f"{name:>{width}}" for name, width, _ in columns)]
    lines += [_sweep_row(run, encoder) for run in runs]
    return "\n".join(lines)


def _sweep_row(run: RunResult, encoder: bool) -> str:
    s = run.summary
    level: list[float | int | str | None] = [
        run.max_concurrency if run.max_concurrency is not None else "-",
        s.completed,
        s.failed,
        s.request_throughput,
    ]
    columns: tuple[tuple[str, int, int], ...]
    if encoder:
        columns = _ENCODER_SWEEP_COLUMNS
        figures = [s.input_throughput, s.e2el_ms.p50, s.e2el_ms.p99]
    else:
        columns = _SWEEP_COLUMNS
        figures = [s.output_throughput, s.ttft_ms.p50, s.ttft_ms.p99, s.tpot_ms.p50, s.itl_ms.p50, s.e2el_ms.p50]
    values = [*level, *figures, s.health_ms.p99]
    return "".join(_sweep_cell(v, w, d) for (_, w, d), v in zip(columns, values, strict=True))


def _sweep_cell(value: float | int | str | None, width: int, decimals: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.{decimals}f}"
    else:
        text = str(value)
    return f"{text:>{width}}"


def format_report(bench: Benchmark) -> str:
    parts = [format_header(bench)]
    if len(bench.runs) == 1:
        parts.append(format_run(bench.runs[0], bench.config.output_len, _encoder(bench)))
    else:
        parts.append(format_sweep(bench.runs, _encoder(bench)))
    return "\n\n".join(parts)


# ---- JSON ----------------------------------------------------------------------------------------


def benchmark_json(bench: Benchmark) -> dict[str, Any]:
    config = dataclasses.asdict(bench.config)
    config["request_rate"] = _finite(bench.config.request_rate)
    config["sweep"] = list(bench.config.sweep)
    config["json_schema"] = None if bench.config.json_schema is None else str(bench.config.json_schema)
    return {
        "tool": "tricklm bench",
        "version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config,
        "tokens_per_word": bench.tokens_per_word,
        "runs": [run_json(run) for run in bench.runs],
    }


def run_json(run: RunResult) -> dict[str, Any]:
    return {
        "max_concurrency": run.max_concurrency,
        "request_rate": _finite(run.request_rate),
        "duration_s": run.duration_s,
        "summary": dataclasses.asdict(run.summary),
        "requests": [request_json(r, run.start, run.prompts[r.index].target_len) for r in run.records],
        "health_supported": run.is_health_supported,
        "speculation": None
        if run.speculation is None
        else {"draft_tokens": run.speculation[0], "accepted_tokens": run.speculation[1]},
        "health": [
            {"t_s": _r(h.sent - run.start), "latency_ms": _ms(h.latency), "status": h.status, "error": h.error}
            for h in run.health
        ],
    }


def request_json(record: RequestRecord, t0: float, target_input_len: int | None) -> dict[str, Any]:
    return {
        "index": record.index,
        "ok": record.is_ok,
        "error_kind": record.error_kind,
        "error": record.error,
        "start_s": _r(record.start - t0),
        "ttft_ms": _ms(ttft(record)),
        "tpot_ms": _ms(tpot(record)),
        "e2el_ms": _ms(e2el(record)),
        "itl_ms": [_ms(gap) for gap in itls(record)],
        "output_tokens": record.output_tokens,
        "usage_output_tokens": record.usage_output_tokens,
        "content_chunks": len(record.chunk_times),
        "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens,
        "turn": record.turn,
        "target_input_len": target_input_len,
        "finish_reason": record.finish_reason,
    }


def write_json(bench: Benchmark, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(benchmark_json(bench), indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _finite(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _r(seconds: float) -> float:
    return round(seconds, 6)
