"""Speculative decoding through the server: counters on /metrics, tricklm bench's acceptance line, usage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tricklm.cli import main
from tricklm.config import EngineConfig
from tricklm.engine.engine import Engine
from tricklm.server.app import create_app
from tricklm.server.testing import running_server

QUOTE = "Repeat this sentence exactly: the engine schedules requests and streams the answers back to the user."


@pytest.fixture(scope="module")
def speculating() -> Iterator[str]:
    engine = Engine(EngineConfig(speculative="ngram"), progress=False)
    with running_server(create_app(engine=engine)) as base:
        yield base
    engine.shutdown()


def _counters(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("tricklm:spec_decode_") and "_total{" in line:
            out[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    return out


def test_drafts_are_counted_and_opting_out_drafts_nothing(speculating: str) -> None:
    chat = {"messages": [{"role": "user", "content": QUOTE}], "max_tokens": 40, "temperature": 0}
    before = _counters(speculating)
    out = httpx.post(f"{speculating}/v1/chat/completions", json={**chat, "speculative": False}, timeout=60)
    assert out.status_code == 200
    assert _counters(speculating) == before
    out = httpx.post(f"{speculating}/v1/chat/completions", json=chat, timeout=60)
    assert out.status_code == 200
    after = _counters(speculating)
    drafted = after["tricklm:spec_decode_num_draft_tokens_total"] - before["tricklm:spec_decode_num_draft_tokens_total"]
    kept = (
        after["tricklm:spec_decode_num_accepted_tokens_total"] - before["tricklm:spec_decode_num_accepted_tokens_total"]
    )
    assert drafted > 0 and 0 < kept <= drafted
    details = out.json()["usage"]["completion_tokens_details"]  # the request's own drafts, as OpenAI names them
    assert details["accepted_prediction_tokens"] == kept
    assert details["rejected_prediction_tokens"] == drafted - kept


def test_bench_prints_the_acceptance(speculating: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--base-url", speculating, "--dataset", "rewrite", "--endpoint", "chat", "--num-prompts", "2"]
    code = main([*args, "--output-len", "48", "--json-out", str(out), "--no-progress"])
    assert code == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["speculation"]["draft_tokens"] >= run["speculation"]["accepted_tokens"] > 0
    assert "acceptance" in capsys.readouterr().out
