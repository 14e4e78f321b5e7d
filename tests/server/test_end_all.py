"""A bounded shutdown's last act: every request ends with the reason, and later ones are refused."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tricklm.config import EngineConfig
from tricklm.engine.engine import Engine
from tricklm.engine.loop import EngineDeadError
from tricklm.engine.request import EngineOutput
from tricklm.engine.sampling_params import SamplingParams


def test_end_all_ends_every_request_and_refuses_later_ones(tiny_model_dir: Path) -> None:
    engine = Engine(EngineConfig(model=str(tiny_model_dir), max_model_len=256), progress=False)
    try:
        ended: dict[str, str] = {}
        done = threading.Event()

        def sink(out: EngineOutput) -> None:
            if out.finished:
                ended[out.request_id] = out.error or str(out.finish_reason)
                if len(ended) == 3:
                    done.set()

        params = SamplingParams(max_tokens=250, ignore_eos=True)
        for i in range(3):
            engine.submit(engine.make_request(f"r{i}", [1, 2, 3], params), sink)
        engine.loop.end_all("the server is shutting down")
        assert done.wait(30), ended
        assert set(ended.values()) == {"the server is shutting down"}
        with pytest.raises(EngineDeadError, match="shutting down"):
            engine.submit(engine.make_request("late", [1, 2, 3], params), sink)
    finally:
        engine.shutdown()
