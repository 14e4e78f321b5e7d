"""Scheduler and KV-cache behaviour on a tiny random model with synthetic sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from agreement import FLOAT_MARGIN, Agreement, check_runs, run_tokens
from tiny_models import make_tiny_model
from tricklm.config import EngineConfig
from tricklm.engine.core import EngineCore
from tricklm.engine.request import EngineOutput, FinishReason, Request, RequestStatus
from tricklm.engine.sampling_params import SamplingParams
from tricklm.model.base import CausalLM
from tricklm.model.weights.loader import load_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> CausalLM:
    return load_model(make_tiny_model(tmp_path_factory.mktemp("m") / "llama", "LlamaForCausalLM"))


def request(rid: str, prompt_len: int, max_tokens: int = 8) -> Request:
    # logprobs: each step's top-2 margin, for comparing runs that sum in other orders
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=2)
    return Request(rid, [3 + (i * 7) % 300 for i in range(prompt_len)], params, max_tokens)


def run_outputs(core: EngineCore, max_steps: int = 500) -> dict[str, list[EngineOutput]]:
    outputs: dict[str, list[EngineOutput]] = {}
    for _ in range(max_steps):
        if not core.has_work:
            return outputs
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def run_to_end(core: EngineCore, max_steps: int = 500) -> dict[str, list[int]]:
    return {rid: run_tokens(outs) for rid, outs in run_outputs(core, max_steps).items()}


def test_chunked_prefill_respects_token_budget(model: CausalLM) -> None:
    core = EngineCore(model, EngineConfig(max_num_batched_tokens=16))
    core.add_request(request("long", 50))
    core.add_request(request("short", 3))
    seen = []
    while core.has_work:
        batch = core.scheduler.schedule()
        assert sum(batch.num_tokens) <= 16
        seen.append(dict(zip([r.request_id for r in batch.requests], batch.num_tokens, strict=True)))
        core.scheduler.update(batch, core.runner.run(batch))
    assert seen[0] == {"long": 16}  # the long prompt takes the whole budget, in chunks
    assert any(step.get("long") == 1 and "short" in step for step in seen) or any(
        step.get("short") == 1 and step.get("long", 0) > 1 for step in seen
    )  # a decode shares a step with another request's prefill chunk


def test_max_num_seqs_limits_running(model: CausalLM) -> None:
    core = EngineCore(model, EngineConfig(max_num_seqs=2))
    for i in range(5):
        core.add_request(request(f"r{i}", 4))
    core.step()
    assert len(core.scheduler.running) == 2 and len(core.scheduler.waiting) == 3
    assert len(run_to_end(core)) == 5


def test_preemption_when_cache_is_full_keeps_outputs_identical(model: CausalLM) -> None:
    alone: dict[str, list[EngineOutput]] = {}
    for i in range(4):
        core = EngineCore(model, EngineConfig())
        core.add_request(request(f"r{i}", 20 + i, max_tokens=40))
        alone.update(run_outputs(core))
    # 8 usable blocks of 16 tokens: four requests of ~60 tokens cannot all stay resident.
    tight = EngineCore(model, EngineConfig(block_size=16, kv_cache_memory=9 * 16 * _bytes_per_token(model)))
    for i in range(4):
        tight.add_request(request(f"r{i}", 20 + i, max_tokens=40))
    together = run_outputs(tight)
    assert tight.scheduler.num_preemptions > 0
    # Batched, and recomputed after a preemption in one prefill instead of token by token: other sums than alone
    agreement = Agreement(FLOAT_MARGIN)
    assert together.keys() == alone.keys()
    for rid in alone:
        check_runs(agreement, together[rid], alone[rid], what=rid)
    agreement.assert_meaningful()
    assert tight.kv_cache.num_free_blocks == tight.kv_cache.num_usable_blocks


def test_abort_of_waiting_request_never_runs(model: CausalLM) -> None:
    core = EngineCore(model, EngineConfig(max_num_seqs=1))
    core.add_request(request("a", 4))
    core.add_request(request("b", 4))
    first = core.step()
    assert [o.request_id for o in first] == ["a"]
    out = core.abort("b")
    assert out is not None and out.finish_reason == FinishReason.ABORT
    tokens = run_to_end(core)
    assert "b" not in tokens and len(tokens["a"]) == 7


def test_abort_of_running_request_frees_its_blocks(model: CausalLM) -> None:
    core = EngineCore(model, EngineConfig())
    req = request("a", 40, max_tokens=100)
    core.add_request(req)
    core.step()
    core.step()
    assert core.kv_cache.num_free_blocks < core.kv_cache.num_usable_blocks
    core.abort("a")
    assert req.status == RequestStatus.FINISHED_ABORTED
    assert core.kv_cache.num_free_blocks == core.kv_cache.num_usable_blocks
    assert not core.has_work


def test_max_model_len_is_capped_by_cache_capacity(model: CausalLM) -> None:
    core = EngineCore(model, EngineConfig(block_size=16, kv_cache_memory=5 * 16 * _bytes_per_token(model)))
    assert core.max_model_len == core.kv_cache.capacity_tokens == 4 * 16


def _bytes_per_token(model: CausalLM) -> int:
    from tricklm.engine.kv_cache import bytes_per_token

    return bytes_per_token(model.config, next(iter(model.parameters())).dtype)  # type: ignore[attr-defined]


def test_tiny_model_path(tmp_path: Path) -> None:
    """The fixture folder is a complete HF model (guards the tests above against a broken helper)."""
    path = make_tiny_model(tmp_path / "x", "LlamaForCausalLM")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
