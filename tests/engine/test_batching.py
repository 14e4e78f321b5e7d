"""Batching must not change results: the default model, one request alone versus inside a busy batch."""

from __future__ import annotations

import pytest

from agreement import FLOAT_MARGIN, Agreement, check_draws, check_runs, run_logprobs
from tricklm.config import EngineConfig
from tricklm.engine.core import EngineCore
from tricklm.engine.request import EngineOutput, Request, TokenLogprob
from tricklm.engine.sampling_params import SamplingParams
from tricklm.model.base import CausalLM
from tricklm.model.resolve import resolve_model
from tricklm.model.weights.loader import load_model
from tricklm.tokenizer import Tokenizer

TARGET_PROMPT = "The three most important inventions of the last century were"


@pytest.fixture(scope="module")
def default_model() -> tuple[CausalLM, Tokenizer]:
    path = resolve_model(None, progress=False)
    return load_model(path), Tokenizer(path)


def make(rid: str, ids: list[int], max_tokens: int, **params: object) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **{"logprobs": 5, **params})  # type: ignore[arg-type]
    return Request(rid, ids, sp, max_tokens)


def run(core: EngineCore, arrivals: dict[int, list[Request]], max_steps: int = 2000) -> dict[str, list[EngineOutput]]:
    """Add requests at the given step numbers; collect every output per request."""
    outputs: dict[str, list[EngineOutput]] = {}
    for step in range(max_steps):
        for req in arrivals.get(step, []):
            core.add_request(req)
        if not core.has_work and step > max(arrivals):
            return outputs
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("did not finish")


def others(tok: Tokenizer) -> dict[int, list[Request]]:
    """15 requests with prompts of 3..~150 tokens, arriving at different steps, of different lengths."""
    arrivals: dict[int, list[Request]] = {}
    for i in range(15):
        text = " ".join(["word"] * (2 + 7 * i)) + f" number {i}"
        ids = tok.encode(text)
        arrivals.setdefault(i % 5, []).append(make(f"o{i}", ids, max_tokens=4 + 2 * i, temperature=0.0))
    return arrivals


def test_greedy_alone_equals_batched_with_15_others(default_model: tuple[CausalLM, Tokenizer]) -> None:
    model, tok = default_model
    ids = tok.encode(TARGET_PROMPT)
    # a sixth entry shows whether the fifth is clear of what the list leaves out
    target = {"temperature": 0.0, "logprobs": 6}
    alone = run(EngineCore(model, EngineConfig()), {0: [make("t", ids, 24, **target)]})["t"]
    arrivals = others(tok)
    arrivals.setdefault(2, []).append(make("t", ids, 24, **target))
    batched_core = EngineCore(model, EngineConfig(max_num_batched_tokens=64))
    batched = run(batched_core, arrivals)
    # Batched and alone, the float32 matmuls sum in another order: logits ~1e-5 apart
    agreement = Agreement(FLOAT_MARGIN)
    n = check_runs(agreement, batched["t"], alone, close=1e-4, what="t")
    for a, b in list(zip(run_logprobs(alone), run_logprobs(batched["t"]), strict=True))[: n + 1]:
        assert_same_ranking(a, b, FLOAT_MARGIN)
    agreement.assert_meaningful()
    assert len(batched) == 16
    assert batched_core.kv_cache.num_free_blocks == batched_core.kv_cache.num_usable_blocks


def assert_same_ranking(a: TokenLogprob, b: TokenLogprob, bound: float) -> None:
    """The top lists rank the same tokens in the same order, except that neighbours within `bound` of each other
    may swap (their order is the paths' rounding). What follows the last clear gap is not compared: it may tie
    with a token neither list shows."""
    start = 0
    for j in range(min(len(a.top), len(b.top)) - 1):
        if max(a.top[j][1] - a.top[j + 1][1], b.top[j][1] - b.top[j + 1][1]) > bound:
            group = slice(start, j + 1)
            assert {t for t, _ in a.top[group]} == {t for t, _ in b.top[group]}, (a.top, b.top)
            start = j + 1


def test_seeded_sampling_alone_equals_batched(default_model: tuple[CausalLM, Tokenizer]) -> None:
    model, tok = default_model
    ids = tok.encode(TARGET_PROMPT)
    params = {"temperature": 1.0, "top_p": 0.9, "seed": 1234}
    alone = run(EngineCore(model, EngineConfig()), {0: [make("t", ids, 24, **params)]})["t"]
    arrivals = others(tok)
    arrivals.setdefault(1, []).append(make("t", ids, 24, **params))
    arrivals.setdefault(1, []).append(make("hot", ids, 24, temperature=1.0))  # unseeded neighbour
    batched = run(EngineCore(model, EngineConfig(max_num_batched_tokens=64)), arrivals)["t"]
    # The draws' uniforms are the same; the distributions they are looked up in are ~1e-5 apart (summation order),
    # which moves a draw to the next token about once in 1e5 steps. Compared while the paths stay that close.
    agreement = Agreement(1e-4)
    check_draws(agreement, batched, alone, what="t")
    agreement.assert_meaningful()


def test_mixed_sampling_settings_in_one_batch(default_model: tuple[CausalLM, Tokenizer]) -> None:
    """Greedy next to temperature 1.0 + top_p next to seeded top_k: each follows its own settings."""
    model, tok = default_model
    ids = tok.encode(TARGET_PROMPT)
    greedy_alone = run(EngineCore(model, EngineConfig()), {0: [make("g", ids, 16, temperature=0.0)]})["g"]
    mixed = {
        0: [
            make("g", ids, 16, temperature=0.0),
            make("hot", ids, 16, temperature=1.0, top_p=0.95),
            make("k", ids, 16, temperature=0.8, top_k=5, seed=7),
        ]
    }
    out = run(EngineCore(model, EngineConfig()), mixed)
    agreement = Agreement(FLOAT_MARGIN)  # a batch of three sums in another order than one alone
    check_runs(agreement, out["g"], greedy_alone, what="g")
    agreement.assert_meaningful()
    for o in out["k"]:
        assert o.logprobs is not None
        top5 = {t for t, _ in o.logprobs[0].top}
        assert o.new_token_ids[0] in top5  # top_k=5 never picks outside the five most likely


def test_a_second_turn_is_the_same_with_the_prefix_cache_on_and_off(default_model: tuple[CausalLM, Tokenizer]) -> None:
    model, tok = default_model
    history = tok.encode(TARGET_PROMPT + " " + " ".join(["and then"] * 60))
    turns, replies = [], []
    for caching in (True, False):
        core = EngineCore(model, EngineConfig(enable_prefix_caching=caching))
        reply = [t for o in run(core, {0: [make("t1", history, 16, temperature=0.0)]})["t1"] for t in o.new_token_ids]
        replies.append(reply)
        turn2 = history + reply + tok.encode(" What happened next?")
        turns.append(run(core, {0: [make("t2", turn2, 16, temperature=0.0)]})["t2"])
        assert (core.kv_cache.num_hit_tokens > 0) == caching
    assert replies[0] == replies[1]  # turn 1 has nothing to hit: the same computation either way
    on, off = turns
    # The cached prefix was computed in other chunks (turn 1's prefill and decodes) than a fresh prefill computes it
    agreement = Agreement(FLOAT_MARGIN)
    check_runs(agreement, on, off, what="turn 2")
    agreement.assert_meaningful()
