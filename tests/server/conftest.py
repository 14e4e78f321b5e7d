"""Live servers for HTTP tests: the default model and a tiny random Llama, each on a free 127.0.0.1 port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tiny_models import make_tiny_model
from tricklm.config import EngineConfig
from tricklm.engine.engine import Engine
from tricklm.server.app import create_app
from tricklm.server.testing import running_server


@pytest.fixture(scope="session")
def default_engine() -> Iterator[Engine]:
    engine = Engine(EngineConfig(), progress=False)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def default_server(default_engine: Engine) -> Iterator[str]:
    """Base URL of a server running SmolLM2-135M-Instruct."""
    with running_server(create_app(engine=default_engine)) as base:
        yield base


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "LlamaForCausalLM")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path) -> Iterator[Engine]:
    engine = Engine(EngineConfig(model=str(tiny_model_dir), max_num_seqs=8), progress=False)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def tiny_server(tiny_engine: Engine) -> Iterator[str]:
    """Base URL of a server running a tiny random Llama (fast; for protocol tests)."""
    with running_server(create_app(engine=tiny_engine)) as base:
        yield base
