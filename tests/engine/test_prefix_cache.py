"""Prefix caching: hashing, sharing by reference count, eviction order, and identical greedy output with the
cache on and off through every engine path (chunked prefill, preemption, aborts, n > 1, sliding window)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from agreement import FLOAT_MARGIN, Agreement, check_runs, run_tokens
from tiny_models import ARCHITECTURES, make_tiny_model
from tricklm.config import EngineConfig
from tricklm.engine.core import EngineCore
from tricklm.engine.kv_cache import bytes_per_token, prefix_hashes
from tricklm.engine.request import EngineOutput, Request
from tricklm.engine.sampling_params import SamplingParams
from tricklm.model.base import CausalLM
from tricklm.model.weights.loader import load_model

BS = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CausalLM]:
    root = tmp_path_factory.mktemp("prefix")
    return {arch: load_model(make_tiny_model(root / arch, arch)) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def llama(models: dict[str, CausalLM]) -> CausalLM:
    return models["LlamaForCausalLM"]


def tokens(n: int, start: int = 0) -> list[int]:
    """`n` token ids, the same for the same `start` (a shorter list is a prefix of a longer one)."""
    rng = random.Random(start)
    return [rng.randrange(3, 300) for _ in range(n)]


def request(rid: str, prompt: list[int], max_tokens: int = 8) -> Request:
    # logprobs: each step's top-2 margin, for comparing the cache on and off (two orders of summation)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=2)
    return Request(rid, list(prompt), params, max_tokens)


def run_outputs(core: EngineCore, max_steps: int = 1000) -> dict[str, list[EngineOutput]]:
    out: dict[str, list[EngineOutput]] = {}
    for _ in range(max_steps):
        if not core.has_work:
            return out
        for o in core.step():
            out.setdefault(o.request_id, []).append(o)
    raise AssertionError("engine did not finish")


def run_to_end(core: EngineCore, max_steps: int = 1000) -> dict[str, list[int]]:
    return {rid: run_tokens(outs) for rid, outs in run_outputs(core, max_steps).items()}


def core_for(model: CausalLM, caching: bool = True, **config: object) -> EngineCore:
    return EngineCore(model, EngineConfig(enable_prefix_caching=caching, block_size=BS, **config))  # type: ignore[arg-type]


# ---- hashing -------------------------------------------------------------------------------------


def test_hashes_cover_full_blocks_and_chain_over_the_whole_prefix() -> None:
    a = request("a", tokens(40))
    b = request("b", tokens(40))
    assert len(prefix_hashes(a, BS)) == 2  # 40 tokens: two full blocks, the rest is not hashed
    assert prefix_hashes(a, BS) == prefix_hashes(b, BS)
    changed = tokens(40)
    changed[3] += 1
    c = request("c", changed)
    # A change in the first block changes every hash after it, even where the block's own tokens agree
    assert all(x != y for x, y in zip(prefix_hashes(a, BS), prefix_hashes(c, BS), strict=True))
    a.output_token_ids.extend(tokens(8, start=40))
    assert len(prefix_hashes(a, BS)) == 3  # extended in place as tokens arrive
    assert len({len(h) for h in prefix_hashes(a, BS)}) == 1 and len(prefix_hashes(a, BS)[0]) == 16


# ---- hits and identical output -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_output_is_identical_with_the_cache_on_and_off(models: dict[str, CausalLM], arch: str) -> None:
    history = tokens(70)
    results = []
    for caching in (True, False):
        core = core_for(models[arch], caching, max_num_batched_tokens=32)  # chunked prefill too
        first = run_to_end_with(core, [request("turn1", history, 12)])
        # The next turn resends the history and what was answered, then more
        turn2 = history + first["turn1"] + tokens(9, start=500)
        second = outputs_with(core, [request("turn2", turn2, 12)])
        cached = core.scheduler.kv.num_hit_tokens
        results.append((first, second, cached))
    (on1, on2, hits), (off1, off2, no_hits) = results
    assert on1 == off1  # nothing to hit yet: the same computation
    # Turn 2 reads turn 1's keys and values from the cache, computed in other chunks than a fresh prefill's
    agreement = Agreement(FLOAT_MARGIN)
    check_runs(agreement, on2["turn2"], off2["turn2"], what=arch)
    agreement.assert_meaningful()
    assert no_hits == 0 and hits == (70 + 12) // BS * BS  # every full block of turn 1's sequence


def run_to_end_with(core: EngineCore, reqs: list[Request]) -> dict[str, list[int]]:
    for r in reqs:
        core.add_request(r)
    return run_to_end(core)


def outputs_with(core: EngineCore, reqs: list[Request]) -> dict[str, list[EngineOutput]]:
    for r in reqs:
        core.add_request(r)
    return run_outputs(core)


def test_a_full_hit_still_computes_the_last_token(llama: CausalLM) -> None:
    core = core_for(llama)
    run_to_end_with(core, [request("a", tokens(48))])
    again = request("b", tokens(48))
    run_to_end_with(core, [again])
    assert again.num_cached_tokens == 32  # not 48: the last token's logits are needed


def test_cached_tokens_reach_the_output(llama: CausalLM) -> None:
    core = core_for(llama)
    run_to_end_with(core, [request("a", tokens(40))])
    core.add_request(request("b", [*tokens(40), 5, 6]))
    outs = []
    while core.has_work:
        outs += core.step()
    assert {o.num_cached_tokens for o in outs} == {32}


# ---- sharing, aborts, eviction --------------------------------------------------------------------


def test_two_requests_share_blocks_and_one_abort_leaves_the_other_intact(llama: CausalLM) -> None:
    shared = tokens(64)
    alone = outputs_with(core_for(llama, False), [request("b", [*shared, 7, 8, 9], 20)])
    core = core_for(llama)
    run_to_end_with(core, [request("warm", [*shared, 1])])
    a, b = request("a", [*shared, 4, 5], 20), request("b", [*shared, 7, 8, 9], 20)
    core.add_request(a)
    core.add_request(b)
    first = core.step()
    assert a.block_table[:4] == b.block_table[:4]  # the four blocks of the shared prefix, once
    kv = core.scheduler.kv
    assert all(kv._refs[blk] == 2 for blk in a.block_table[:4])
    core.abort("a")
    assert all(kv._refs[blk] == 1 for blk in b.block_table[:4])
    rest = run_outputs(core)
    # b read the shared prefix from the cache, in a batch with a: other sums than b alone with no cache
    agreement = Agreement(FLOAT_MARGIN)
    check_runs(agreement, [o for o in first if o.request_id == "b"] + rest["b"], alone["b"], what="b")
    agreement.assert_meaningful()
    assert kv.num_free_blocks == kv.num_usable_blocks  # everything back: free or cached, unreferenced


def test_unused_cached_blocks_are_evicted_least_recently_freed_first_and_tails_first(llama: CausalLM) -> None:
    core = core_for(llama, kv_cache_memory=12 * BS * bytes_per_token(llama.config, torch.float32))
    kv = core.scheduler.kv
    run_to_end_with(core, [request("old", tokens(48, start=0), 1)])
    run_to_end_with(core, [request("new", tokens(48, start=1000), 1)])
    old_blocks, new_blocks = list(kv._evictable)[:3], list(kv._evictable)[3:]
    assert old_blocks[0] > old_blocks[1] > old_blocks[2]  # "old"'s tail block first
    assert len(new_blocks) == 3 and kv.num_cached_blocks == 6
    # A prompt that needs every never-cached free block and two more evicts "old"'s last two blocks
    filler = request("filler", tokens(len(kv._free) * BS + 2 * BS - 1, start=5000), 1)
    core.add_request(filler)
    core.step()
    old_hashes = prefix_hashes(request("old", tokens(48, start=0)), BS)
    assert [kv._block_of.get(h) for h in old_hashes] == [old_blocks[2], None, None]
    new_hashes = prefix_hashes(request("new", tokens(48, start=1000)), BS)
    assert all(h in kv._block_of for h in new_hashes)
    # What is left of "old" is its first block: a prompt sharing it still hits
    again = request("again", tokens(40, start=0), 1)
    run_to_end_with(core, [again])
    assert again.num_cached_tokens == BS


def test_free_blocks_are_used_before_any_cached_one_is_evicted(llama: CausalLM) -> None:
    core = core_for(llama)
    kv = core.scheduler.kv
    for i in range(10):  # ten different prompts, one after another, far inside the budget
        run_to_end_with(core, [request(f"r{i}", tokens(50, start=1000 * i), 4)])
    assert kv.num_cached_blocks == 30  # three full blocks of each: nothing evicted yet


# ---- preemption, n > 1, sliding window -----------------------------------------------------------


def test_preemption_with_shared_blocks_keeps_outputs_identical(llama: CausalLM) -> None:
    budget = 9 * BS * bytes_per_token(llama.config, torch.float32)
    shared = tokens(20)
    results = []
    for caching in (True, False):
        tight = core_for(llama, caching, kv_cache_memory=budget)
        reqs = [request(f"r{i}", shared + tokens(i + 1, start=100 * i), 40) for i in range(4)]
        results.append(outputs_with(tight, reqs))
        assert tight.scheduler.num_preemptions > 0
        assert tight.kv_cache.num_free_blocks == tight.kv_cache.num_usable_blocks
    on, off = results
    # With the cache, a preempted request resumes from cached blocks instead of a fresh prefill: other sums
    agreement = Agreement(FLOAT_MARGIN)
    assert on.keys() == off.keys()
    for rid in off:
        check_runs(agreement, on[rid], off[rid], what=rid)
    agreement.assert_meaningful()


def test_choices_of_one_prompt_share_its_blocks(llama: CausalLM) -> None:
    prompt = tokens(100)
    core = core_for(llama)
    choices = [request(f"c{i}", prompt, 4) for i in range(3)]
    out = outputs_with(core, choices)
    # The first computes the prompt; the others wait for it, then start after its six full blocks
    assert [c.num_cached_tokens for c in choices] == [0, 96, 96]
    # ... so they sum the prompt in other chunks than the first
    agreement = Agreement(FLOAT_MARGIN)
    check_runs(agreement, out["c1"], out["c0"], what="c1")
    check_runs(agreement, out["c2"], out["c0"], what="c2")
    agreement.assert_meaningful()


def test_sliding_window_model_hits_and_matches(models: dict[str, CausalLM]) -> None:
    model = models["MistralForCausalLM"]  # window 8, shorter than a block
    prompt = tokens(60)
    off = outputs_with(core_for(model, False), [request("a", prompt, 10)])
    core = core_for(model)
    run_to_end_with(core, [request("warm", prompt[:50])])
    again = request("a", prompt, 10)
    on = outputs_with(core, [again])
    assert again.num_cached_tokens == 48
    agreement = Agreement(FLOAT_MARGIN)  # 48 tokens from the cache, computed in other chunks
    check_runs(agreement, on["a"], off["a"], what="a")
    agreement.assert_meaningful()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_the_kv_budget_becomes_resident_as_blocks_are_written(llama: CausalLM) -> None:
    from tricklm.engine.kv_cache import KVCache

    # 128 MiB: far more than the heap's churn around it, so its pages can be told apart
    num_blocks = 128 * 2**20 // (bytes_per_token(llama.config, torch.float16) * 16)
    before = _resident_bytes()
    cache = KVCache(llama.config, num_blocks=num_blocks, block_size=16, dtype=torch.float16, prefix_caching=True)
    budget = sum(layer.kv.numel() * layer.kv.element_size() for layer in cache.layers)
    assert _resident_bytes() - before < budget / 8  # only block 0 of each layer is written
    for layer in cache.layers:
        layer.kv[:, 16 : layer.kv.shape[1] // 2].fill_(1.0)  # half the slots handed out and written
    assert _resident_bytes() - before > budget / 4
