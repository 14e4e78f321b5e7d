"""Several models in one server: each request's `model` picks one, /v1/models lists them all, every route
refuses a model that does not do what it does, and each generating model has its own engine and metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tiny_models import make_cross_encoder, make_tiny_model
from tricklm.config import EngineConfig
from tricklm.engine.embedder import Embedder
from tricklm.engine.engine import Engine
from tricklm.model.config import ModelLoadError
from tricklm.model.resolve import resolve_model
from tricklm.options import build_parser, replica_plan, server_config
from tricklm.server.app import create_app
from tricklm.server.run import _check_memory, _share_cores
from tricklm.server.state import ServerState
from tricklm.server.testing import free_port, running_server, wait_healthy

EMBEDDER = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def second_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    folder = make_tiny_model(tmp_path_factory.mktemp("second") / "qwen", "Qwen2ForCausalLM")
    engine = Engine(EngineConfig(model=str(folder), max_num_seqs=4), progress=False)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def several(tiny_engine: Engine, second_engine: Engine) -> Iterator[str]:
    models = [tiny_engine, second_engine, Embedder(resolve_model(EMBEDDER), EMBEDDER)]
    with running_server(create_app(models=models)) as base:
        yield base


def _chat(base: str, model: str | None) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    return httpx.post(f"{base}/v1/chat/completions", json=body | ({"model": model} if model else {}), timeout=60)


def test_each_request_reaches_the_model_it_names(several: str) -> None:
    cards = httpx.get(f"{several}/v1/models", timeout=10).json()["data"]
    assert [(c["id"], c["task"]) for c in cards] == [("llama", "generate"), ("qwen", "generate"), (EMBEDDER, "embed")]
    assert _chat(several, "qwen").json()["model"] == "qwen"
    assert _chat(several, "llama").json()["model"] == "llama"
    assert _chat(several, None).json()["model"] == "llama"  # none named: the first that generates
    embedded = httpx.post(f"{several}/v1/embeddings", json={"input": "hi"}, timeout=30).json()
    assert embedded["model"] == EMBEDDER and len(embedded["data"][0]["embedding"]) == 384
    assert httpx.get(f"{several}/v1/models/qwen", timeout=10).json()["max_model_len"] > 0
    metrics = httpx.get(f"{several}/metrics", timeout=10).text
    for name in ("llama", "qwen"):
        assert f'tricklm:generation_tokens_total{{model_name="{name}"}}' in metrics
    assert f'tricklm:encoder_inputs_total{{model_name="{EMBEDDER}"}} 1.0' in metrics


def test_an_encoder_beside_a_generating_model_steps_back(tiny_engine: Engine) -> None:
    """Beside a generating engine, an encoder computes on one thread at a lower priority (engine/embedder.py)."""
    state = ServerState()
    embedder = Embedder(resolve_model(EMBEDDER), EMBEDDER)
    state.add(embedder)
    assert not embedder.background
    vector = embedder.embed(embedder.tokenize(["before"]))
    state.add(tiny_engine)
    assert embedder.background
    assert torch.allclose(embedder.embed(embedder.tokenize(["before"])), vector, atol=1e-5)
    embedder.shutdown()
    state.shutdown()  # the engine is the session's: not owned, so only its client stops


def test_a_wrong_or_unknown_model_is_refused_by_name(several: str) -> None:
    r = _chat(several, EMBEDDER)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_generative"
    r = httpx.post(f"{several}/v1/embeddings", json={"model": "qwen", "input": "hi"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_embedding"
    for r in (_chat(several, "gpt-4o"), httpx.get(f"{several}/v1/models/gpt-4o", timeout=10)):
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    tokenized = httpx.post(f"{several}/tokenize", json={"model": "qwen", "prompt": "hello"}, timeout=10)
    assert tokenized.status_code == 200
    generated = httpx.post(f"{several}/generate", json={"model": "qwen", "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert generated.status_code == 200 and generated.json()["completion_tokens"] == 2
    unknown = httpx.post(f"{several}/generate", json={"model": "gpt-4o", "prompt": "hi"}, timeout=30)
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["detail"]
    assert httpx.get(f"{several}/health", timeout=10).status_code == 200


def test_several_generating_models_share_the_cores() -> None:
    cores = os.cpu_count() or 1
    shared = _share_cores(EngineConfig(), 2)
    assert shared.num_threads == shared.decode_threads == max(1, cores // 2)
    assert _share_cores(EngineConfig(), 1) == EngineConfig()  # one model: every core, as alone
    chosen = EngineConfig(num_threads=2)
    assert _share_cores(chosen, 3) == chosen  # threads given: as given


def test_the_default_model_can_be_named() -> None:
    assert resolve_model("SmolLM2-135M-Instruct") == resolve_model(None)


def test_serve_options_for_several_models() -> None:
    args = build_parser().parse_args(["serve", "--model", "a", "--model", "b", "--served-model-name", "x"])
    config = server_config(args)
    assert config.models == ("b",) and config.served_model_names == ("x",)
    with pytest.raises(ValueError, match="3 --served-model-name for 2 --model"):
        server_config(
            build_parser().parse_args(["serve", "--model", "a", "--model", "b", *["--served-model-name", "x"] * 3])
        )
    with pytest.raises(ValueError, match="serves one model"):
        replica_plan(build_parser().parse_args(["serve", "--replicas", "2", "--model", "a", "--model", "b"]))


def _serve(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tricklm", "serve", "--port", str(port), "--log-level", "warning", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), f"http://127.0.0.1:{port}"


def test_tricklm_serve_with_a_chat_model_an_embedder_and_a_reranker(tiny_model_dir: Path, tmp_path: Path) -> None:
    reranker = make_cross_encoder(tmp_path / "reranker")
    proc, base = _serve(
        *["--model", str(tiny_model_dir), "--model", EMBEDDER, "--model", str(reranker)],
        *["--served-model-name", "chat", "--served-model-name", "embed"],
    )
    try:
        wait_healthy(base, 120, lambda: proc.poll() is None)
        ids = [c["id"] for c in httpx.get(f"{base}/v1/models", timeout=10).json()["data"]]
        assert ids == ["chat", "embed", "reranker"]
        assert _chat(base, "chat").status_code == 200
        ranked = httpx.post(f"{base}/v1/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=30)
        assert ranked.status_code == 200 and ranked.json()["model"] == "reranker"
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0 and b"Traceback" not in stderr, stderr.decode(errors="replace")[-3000:]


def test_models_over_the_memory_limit_are_refused_at_start() -> None:
    """What `tricklm serve --memory-limit` does after each model loads (server/run.py), with a real model."""
    embedder = Embedder(resolve_model(EMBEDDER), EMBEDDER)
    held = {"chat": 10 << 20, EMBEDDER: embedder.memory_bytes}
    _check_memory(held, 200 << 20, embedder)  # 96 MiB: within
    with pytest.raises(
        ModelLoadError, match=f"hold 96 MiB .chat 10 MiB, {EMBEDDER} 86 MiB., more than --memory-limit 40"
    ):
        _check_memory(held, 40 << 20, embedder)
