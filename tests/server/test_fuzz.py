"""A bounded schema-driven fuzz run (schemathesis) over every operation in /openapi.json, against a live
server: data that fits the schema and data that does not; no 5xx, and every response has a documented
status, content type and body schema.

The operations come from the app's own schema at collection time; schemathesis's pytest plugin is not
used (its lazy-schema path does not run under pytest 9).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tiny_models import make_cross_encoder
from tricklm.config import EngineConfig
from tricklm.engine.embedder import Embedder, Reranker
from tricklm.engine.engine import Engine
from tricklm.model.resolve import resolve_model
from tricklm.server.app import create_app
from tricklm.server.testing import running_server

EXAMPLES = 60  # per operation and mode: 9 operations x 2 modes, well under a minute on 2 cores
SCHEMA = schemathesis.openapi.from_dict(create_app().openapi())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A generating model, an embedding model and a reranker: a request that names no model reaches the one
    its route uses."""
    # A short context bounds every generation the fuzzer can ask for
    engine = Engine(EngineConfig(model=str(tiny_model_dir), max_num_seqs=4, max_model_len=96), progress=False)
    encoders = [
        Embedder(resolve_model("all-MiniLM-L6-v2"), "all-MiniLM-L6-v2"),
        Reranker(make_cross_encoder(tmp_path_factory.mktemp("fuzz") / "reranker"), "reranker"),
    ]
    try:
        with running_server(create_app(models=[engine, *encoders])) as base:
            yield base
    finally:
        engine.shutdown()
        for encoder in encoders:
            encoder.shutdown()


def test_the_schema_has_every_route() -> None:
    labels = {op.label for op in OPERATIONS}
    assert {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/messages",
        "POST /generate",
        "POST /v1/embeddings",
        "POST /v1/rerank",
        "GET /health",
    } <= labels


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_every_operation_answers_within_its_schema(fuzz_server: str, operation: object, mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))  # type: ignore[attr-defined]
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case: Case) -> None:
        case.call_and_validate(base_url=fuzz_server, checks=CHECKS, timeout=60)

    try:
        run()
    except Unsatisfiable:
        # Negative mode where every input is a plain string (or there is none): nothing can be made invalid
        assert mode is GenerationMode.NEGATIVE
        pytest.skip("nothing to make invalid")
    # and the server still answers an ordinary request
    ok = httpx.post(fuzz_server + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
