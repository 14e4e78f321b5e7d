"""Peak memory of `tricklm serve`: at load, and while serving concurrent streams (issue 14's target).

Starts `tricklm serve --model MODEL [serve args]` on 127.0.0.1 and a free port, waits until /health
answers, reads the server's /proc/PID/status (VmHWM, the kernel's own peak of resident memory, and
VmRSS split into RssAnon and RssFile), runs `tricklm bench` with `--concurrency` streams (bounded by
`--bench-timeout`), reads them again, then stops the server. Meanwhile a sampler reads VmRSS every
20 ms, so the table also says when the peak happened. Figures in GB are 1e9 bytes (the target's unit),
in MiB 2^20 bytes.

    .venv/bin/python benchmarks/serve_memory.py --model /tmp/smollm2-1.7b-q4_1.gguf \\
        --out benchmarks/results/serve-memory-1.7b.txt -- --kv-cache-memory 512MiB
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tricklm.server.testing import free_port

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
SAMPLE_SECONDS = 0.02
TARGET_BYTES = 2.0e9


def status(pid: int) -> dict[str, int]:
    """The memory fields of /proc/PID/status, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0]) * 1024
    return out


@dataclass
class Sampler:
    """VmRSS every SAMPLE_SECONDS, and the phase (load, idle, bench) in which its maximum happened."""

    pid: int
    phase: str = "load"
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                now = status(self.pid)
                best = self.peaks.setdefault(self.phase, now)
                if now["VmRSS"] > best["VmRSS"]:
                    self.peaks[self.phase] = now
            self._stop.wait(SAMPLE_SECONDS)

    @contextlib.contextmanager
    def running(self) -> Iterator[Sampler]:
        thread = threading.Thread(target=self.run, name="rss-sampler", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=5)


def wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until /health answered 200; raises if the server exits or takes longer than `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} while loading")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        time.sleep(0.1)
    raise TimeoutError(f"the server was not healthy within {timeout:g} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group; SIGKILL if it is still there after 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
            return


def cpu_model() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"
    return "?"


def bench_command(base: str, args: argparse.Namespace, json_out: Path) -> list[str]:
    return [
        sys.executable, "-m", "tricklm", "bench", "--base-url", base, "--max-concurrency", str(args.concurrency),
        "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len), "--output-len",
        str(args.output_len), "--timeout", str(args.bench_timeout), "--no-progress", "--json-out", str(json_out),
    ]  # fmt: skip


def measure(args: argparse.Namespace, log: Path) -> tuple[list[tuple[str, dict[str, int]]], Sampler, str]:
    """(rows of the table, the sampler, the bench's outcome) for one server run."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tricklm", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--model", args.model, *args.serve_args]
    rows: list[tuple[str, dict[str, int]]] = []
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = Sampler(proc.pid)
    try:
        with sampler.running():
            seconds = wait_healthy(base, proc, args.ready_timeout)
            rows.append((f"after load ({seconds:.1f} s)", status(proc.pid)))
            sampler.phase = "bench"
            with tempfile.TemporaryDirectory() as tmp:
                done = subprocess.run(
                    bench_command(base, args, Path(tmp) / "bench.json"),
                    capture_output=True, text=True, timeout=args.bench_timeout + 60,
                )  # fmt: skip
            outcome = _bench_outcome(done)
            rows.append((f"after {args.concurrency}-stream bench", status(proc.pid)))
            sampler.phase = "idle"
            time.sleep(1.0)
    finally:
        stop(proc)
    return rows, sampler, outcome


def _bench_outcome(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stdout.splitlines() if line.lstrip().startswith(("requests", "throughput"))]
    if done.returncode:
        return f"bench exited with {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    return "; ".join(line.strip() for line in lines[:3]) or "bench done"


def gb(value: int) -> str:
    return f"{value / 1e9:.3f}"


def mib(value: int) -> str:
    return f"{value / 2**20:.0f}"


def report(args: argparse.Namespace, rows: list[tuple[str, dict[str, int]]], sampler: Sampler, bench: str) -> str:
    serve = " ".join(["tricklm serve --model", args.model, *map(shlex.quote, args.serve_args)])
    lines = [
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_model()}",
        f"# server: {serve}",
        f"# bench: {args.concurrency} streams, {args.num_prompts} prompts of {args.input_len} tokens, "
        f"{args.output_len} tokens each; {bench}",
        "# GB = 1e9 bytes, MiB = 2^20 bytes; VmHWM is the kernel's peak of VmRSS since the server started",
        "",
        f"| {'when':<28} | VmHWM GB | VmRSS GB | RssAnon MiB | RssFile MiB |",
        f"|{'-' * 30}|----------|----------|-------------|-------------|",
    ]
    for name, s in rows:
        lines.append(
            f"| {name:<28} | {gb(s['VmHWM']):>8} | {gb(s['VmRSS']):>8} | {mib(s['RssAnon']):>11} "
            f"| {mib(s['RssFile']):>11} |"
        )
    lines.append("")
    for phase, s in sampler.peaks.items():
        lines.append(
            f"largest sampled VmRSS during {phase}: {gb(s['VmRSS'])} GB "
            f"(anon {mib(s['RssAnon'])} MiB, file {mib(s['RssFile'])} MiB)"
        )
    peak = max(s["VmHWM"] for _, s in rows)
    verdict = "within" if peak <= TARGET_BYTES else "over"
    lines.append(f"peak RSS {gb(peak)} GB: {verdict} the target of {TARGET_BYTES / 1e9:.1f} GB")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/smollm2-1.7b-q4_1.gguf")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--bench-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    p.add_argument("serve_args", nargs="*", help="after --: more `tricklm serve` options")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = args.out.with_suffix(".log") if args.out else Path(tempfile.gettempdir()) / "serve-memory.log"
    rows, sampler, bench = measure(args, log)
    text = report(args, rows, sampler, bench)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
