"""PNG charts of a benchmark, drawn with matplotlib's object API (Agg canvas, no pyplot global state).

A single run gives a TTFT CDF; a sweep adds throughput and TTFT p50/p99 against concurrency, and
overlays the TTFT CDFs of all load levels.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tricklm.bench.metrics import ttft
from tricklm.bench.runner import Benchmark, RunResult

_SIZE = (7.0, 4.5)


def plot_benchmark(bench: Benchmark, out_dir: Path) -> list[Path]:
    """Write the charts for `bench` into `out_dir` and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{bench.config.model} · {bench.config.endpoint}"
    paths = [ttft_cdf(bench.runs, out_dir / "ttft_cdf.png", title)]
    swept = [run for run in bench.runs if run.max_concurrency is not None]
    if len(swept) > 1:
        paths.append(throughput_vs_concurrency(swept, out_dir / "throughput_vs_concurrency.png", title))
        paths.append(ttft_vs_concurrency(swept, out_dir / "ttft_vs_concurrency.png", title))
    return paths


def ttft_cdf(runs: list[RunResult], path: Path, title: str) -> Path:
    fig, ax = _figure()
    for run in runs:
        values = sorted(t * 1000 for r in run.records if r.is_ok and (t := ttft(r)) is not None)
        if values:
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, fractions, where="post", label=_label(run))
    ax.set(
        xlabel="time to first token (ms)", ylabel="fraction of requests", ylim=(0, 1.02), title=f"TTFT CDF — {title}"
    )
    _finish(fig, ax, path, legend=len(runs) > 1)
    return path


def throughput_vs_concurrency(runs: list[RunResult], path: Path, title: str) -> Path:
    fig, ax = _figure()
    levels = [run.max_concurrency or 0 for run in runs]
    ax.plot(levels, [run.summary.output_throughput for run in runs], "o-", label="output tokens/s")
    ax.set(xlabel="max concurrency", ylabel="output tokens/s", title=f"Throughput — {title}")
    right = ax.twinx()
    right.plot(levels, [run.summary.request_throughput for run in runs], "s--", color="tab:orange", label="requests/s")
    right.set_ylabel("requests/s")
    right.set_ylim(bottom=0)
    _concurrency_axis(ax, levels)
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    _finish(fig, ax, path, legend=False)
    return path


def ttft_vs_concurrency(runs: list[RunResult], path: Path, title: str) -> Path:
    fig, ax = _figure()
    levels = [run.max_concurrency or 0 for run in runs]
    for name in ("p50", "p99"):
        values = [getattr(run.summary.ttft_ms, name) for run in runs]
        ax.plot(levels, [float("nan") if v is None else v for v in values], "o-", label=f"TTFT {name}")
    ax.set(xlabel="max concurrency", ylabel="time to first token (ms)", title=f"TTFT — {title}")
    _concurrency_axis(ax, levels)
    _finish(fig, ax, path, legend=True)
    return path


def _label(run: RunResult) -> str:
    if run.max_concurrency is not None:
        return f"concurrency {run.max_concurrency}"
    return f"rate {run.request_rate:g}/s"


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=_SIZE, dpi=110)
    return fig, fig.add_subplot()


def _concurrency_axis(ax: Axes, levels: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(level) for level in levels])
    ax.set_ylim(bottom=0)


def _finish(fig: Figure, ax: Axes, path: Path, legend: bool) -> None:
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
