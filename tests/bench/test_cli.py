"""`tricklm bench` end to end: against a live tricklm (tiny random model) and against a misbehaving server."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tiny_models import make_cross_encoder
from tricklm.cli import main
from tricklm.engine.embedder import Embedder, Reranker
from tricklm.engine.engine import Engine
from tricklm.model.resolve import resolve_model
from tricklm.server.app import create_app
from tricklm.server.testing import free_port, running_server

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(base: str, tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "bench.json"
    argv = ["bench", "--base-url", base, "--json-out", str(out), "--plot", str(tmp_path / "plots"), "--no-progress"]
    code = main([*argv, *extra])
    return code, json.loads(out.read_text()) if out.exists() else {}


# ---- live tricklm --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rag_server(tiny_engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A chat model (listed first), an embedding model and a reranker in one server."""
    reranker = Reranker(make_cross_encoder(tmp_path_factory.mktemp("reranker") / "ce"), "ce")
    models = [tiny_engine, Embedder(resolve_model("all-MiniLM-L6-v2"), "minilm"), reranker]
    with running_server(create_app(models=models)) as base:
        yield base


@pytest.mark.parametrize(("endpoint", "model"), [("embeddings", "minilm"), ("rerank", "ce")])
def test_embeddings_and_rerank_are_measured_in_texts_a_second(
    rag_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], endpoint: str, model: str
) -> None:
    args = ["--endpoint", endpoint, "--dataset", "prompts", "--batch-size", "5", "--num-prompts", "4", "--sweep", "1,2"]
    code, doc = bench(rag_server, tmp_path, *args)
    assert code == 0 and doc["config"]["model"] == model  # the first listed model that does this
    for run in doc["runs"]:
        summary = run["summary"]
        assert (summary["completed"], summary["failed"], summary["total_inputs"]) == (4, 0, 20)
        assert summary["input_throughput"] > 0 and summary["total_input_tokens"] > 20
        assert summary["e2el_ms"]["count"] == 4 and summary["ttft_ms"]["count"] == 0
    table = capsys.readouterr().out
    assert "texts/s" in table and "TTFT" not in table


def test_single_run_against_tricklm(tiny_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--num-prompts", "6", "--max-concurrency", "2", "--input-len", "16", "--output-len", "8"]
    code, doc = bench(tiny_server, tmp_path, *args)
    assert code == 0
    assert doc["config"]["model"]  # found through /v1/models
    assert doc["tokens_per_word"] > 0  # calibrated through /tokenize
    (run,) = doc["runs"]
    summary = run["summary"]
    assert (summary["completed"], summary["failed"], run["max_concurrency"]) == (6, 0, 2)
    assert summary["total_output_tokens"] == 6 * 8  # ignore_eos, counted from usage
    assert summary["ttft_ms"]["count"] == 6 and summary["ttft_ms"]["p99"] > 0
    assert summary["request_throughput"] > 0 and summary["output_throughput"] > 0
    assert run["health_supported"] and summary["health_probes"] >= 1 and summary["health_failed"] == 0
    for req in run["requests"]:
        assert req["ok"] and req["output_tokens"] == 8 and req["usage_output_tokens"] == 8
        assert 0 < req["ttft_ms"] <= req["e2el_ms"]
        assert len(req["itl_ms"]) == req["content_chunks"] - 1
        assert abs(req["prompt_tokens"] - 16) <= 8  # roughly the asked length after calibration
    assert (tmp_path / "plots" / "ttft_cdf.png").read_bytes().startswith(PNG_MAGIC)
    table = capsys.readouterr().out
    assert "TTFT" in table and "6 completed, 0 failed" in table


def test_chat_sweep_with_the_prompt_set(tiny_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--endpoint", "chat", "--dataset", "prompts", "--sweep", "1,2", "--num-prompts", "3", "--output-len", "4"]
    code, doc = bench(tiny_server, tmp_path, *args, "--warmup", "1")
    assert code == 0
    assert [r["max_concurrency"] for r in doc["runs"]] == [1, 2]
    assert all(r["summary"]["completed"] == 3 and r["summary"]["total_output_tokens"] == 12 for r in doc["runs"])
    for name in ("ttft_cdf", "throughput_vs_concurrency", "ttft_vs_concurrency"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    table = capsys.readouterr().out
    assert "TTFT p99" in table and "out tok/s" in table


@pytest.mark.parametrize("endpoint", ["messages", "responses"])
def test_the_agent_apis_are_measured_the_same_way(tiny_server: str, tmp_path: Path, endpoint: str) -> None:
    args = [
        "--endpoint",
        endpoint,
        "--num-prompts",
        "4",
        "--max-concurrency",
        "2",
        "--input-len",
        "16",
        "--output-len",
        "6",
    ]
    code, doc = bench(tiny_server, tmp_path, *args)
    assert code == 0
    (run,) = doc["runs"]
    assert (run["summary"]["completed"], run["summary"]["failed"]) == (4, 0)
    assert run["summary"]["total_output_tokens"] == 4 * 6  # ignore_eos honoured, counted from usage
    for req in run["requests"]:
        assert req["usage_output_tokens"] == 6 and req["prompt_tokens"] > 0
        assert len(req["itl_ms"]) == req["content_chunks"] - 1


def test_open_loop_request_rate(tiny_server: str, tmp_path: Path) -> None:
    code, doc = bench(tiny_server, tmp_path, "--num-prompts", "4", "--request-rate", "50", "--output-len", "2")
    assert code == 0
    (run,) = doc["runs"]
    assert run["request_rate"] == 50.0 and run["max_concurrency"] is None
    assert run["summary"]["completed"] == 4


# ---- a server that misbehaves --------------------------------------------------------------------

KINDS = ("ok", "http_500", "drop", "error_event", "no_done", "stall")


def chunk(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": None}]}).encode() + b"\n\n"


async def misbehave(kind: str, max_tokens: int) -> AsyncIterator[bytes]:
    for i in range(max_tokens):
        if i == 2 and kind == "drop":
            raise RuntimeError("simulated crash mid-stream")  # uvicorn closes the connection
        if i == 2 and kind == "stall":
            await asyncio.sleep(1.5)
        if i == 2 and kind == "error_event":
            yield b'data: {"error": {"message": "engine died", "type": "server_error"}}\n\n'
            break
        yield chunk(f" t{i}")
    usage = {"prompt_tokens": 3, "completion_tokens": max_tokens, "total_tokens": 3 + max_tokens}
    yield b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
    if kind != "no_done":
        yield b"data: [DONE]\n\n"


def flaky_app(kinds: tuple[str, ...]) -> FastAPI:
    """Request i (in arrival order) behaves as kinds[i % len(kinds)]; no /tokenize (404)."""
    app = FastAPI()
    counter = itertools.count()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "flaky-model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.json()
        kind = kinds[next(counter) % len(kinds)]
        if kind == "http_500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        return StreamingResponse(misbehave(kind, body["max_tokens"]), media_type="text/event-stream")

    return app


def test_errors_and_drops_are_counted_as_failed_requests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--num-prompts", "12", "--max-concurrency", "3", "--output-len", "5", "--warmup", "0", "--timeout", "0.5"]
    with running_server(flaky_app(KINDS)) as base:
        code, doc = bench(base, tmp_path, *args)
    assert code == 0
    summary = doc["runs"][0]["summary"]
    assert (summary["completed"], summary["failed"]) == (2, 10)
    assert summary["errors"] == {"http_status": 2, "connection": 2, "stream_error": 2, "incomplete": 2, "timeout": 2}
    assert summary["total_output_tokens"] == 2 * 5
    assert doc["config"]["model"] == "flaky-model" and doc["tokens_per_word"] is None
    failed = [r for r in doc["runs"][0]["requests"] if not r["ok"]]
    assert all(r["error"] for r in failed)
    assert "2 completed, 10 failed" in capsys.readouterr().out


def test_all_failed_exits_1_and_unreachable_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_server(flaky_app(("http_500",))) as base:
        code, doc = bench(base, tmp_path, "--num-prompts", "3", "--warmup", "1")
    assert code == 1 and doc["runs"][0]["summary"]["failed"] == 3
    code, doc = bench(f"http://127.0.0.1:{free_port()}", tmp_path / "none", "--num-prompts", "1")
    assert code == 2 and doc == {}
    assert "cannot list models" in capsys.readouterr().err


def test_multi_turn_conversations_resend_their_history(
    tiny_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--dataset", "multi-turn", "--num-prompts", "3", "--turns", "3", "--max-concurrency", "2"]
    code, doc = bench(
        tiny_server, tmp_path, *args, "--input-len", "20", "--output-len", "6", "--system-prompt-len", "50"
    )
    assert code == 0
    (run,) = doc["runs"]
    assert run["summary"]["completed"] == 9
    by_conversation = [run["requests"][i : i + 3] for i in range(0, 9, 3)]
    for turns in by_conversation:
        assert [r["turn"] for r in turns] == [1, 2, 3]
        sizes = [r["prompt_tokens"] for r in turns]
        assert sizes[0] < sizes[1] < sizes[2]  # each turn carries the history and the answers before it
        assert all(r["cached_tokens"] >= 48 for r in turns[1:])  # the history's full blocks hit
    # Conversations of one run share the system prompt: the later ones hit it from the first turn
    assert max(turns[0]["cached_tokens"] for turns in by_conversation) >= 48
    table = capsys.readouterr().out
    assert "TTFT p50 by turn (ms)" in table and "reported cached" in table
