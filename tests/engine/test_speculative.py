"""Speculative decoding with n-gram drafts: the lookup, the verdict (greedy and rejection sampling against
the non-speculative sampler's frequencies), and the engine's output against its own without drafts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch

from agreement import Agreement
from tricklm.config import EngineConfig
from tricklm.engine.engine import Engine
from tricklm.engine.llm import LLM
from tricklm.engine.request import Request
from tricklm.engine.sampler import sample
from tricklm.engine.sampling_params import SamplingParams
from tricklm.engine.speculative import SpecState, propose, verify

# A draft's rows and a lone decode row read the same int8 blocks with the same per-row activation rounding;
# only the float sums of block products may differ in order (by ~1e-5 here): a near-tie is a gap below this
SPEC_MARGIN = 0.05
REWRITE = (
    "Rewrite the following paragraph in plain words, keeping every fact:\n\n"
    "The engine schedules requests, computes tokens in batches, and streams the answers back to the user. "
    "A request that arrives while others are decoding joins the next step; its prompt is computed in chunks "
    "so that running streams never wait long. When the cache is full, the newest request is preempted.\n\n"
    "Rewritten:"
)


def test_the_longest_earlier_suffix_gives_the_draft() -> None:
    tokens = [1, 2, 3, 4, 5, 9, 9, 2, 3, 4]
    assert propose(tokens, 3, 2, 4) == [5, 9, 9]  # "2 3 4" occurred before, followed by 5 9 9
    assert propose(tokens, 1, 2, 4) == [5]
    assert propose([1, 2, 3, 1, 2], 5, 2, 4) == [3, 1, 2]  # up to the end of what is known
    assert propose([7, 8, 9], 3, 2, 4) == []  # no suffix occurred before
    assert propose([5, 5, 5, 5], 2, 2, 4) == [5]  # the most recent earlier occurrence ends before the last token


def test_the_byte_search_finds_only_whole_tokens() -> None:
    # 256 = 0x100 and 1 = 0x1: as little-endian int32 bytes, a misaligned match of [1, 0] exists inside
    tokens = [256, 0, 7, 1, 0]
    assert propose(tokens, 2, 2, 2) == []


def test_draft_length_adapts_and_backs_off() -> None:
    state = SpecState(k=4)
    state.after(4, 4, max_draft=6)
    assert state.k == 5
    state.after(5, 2, max_draft=6)
    assert state.k == 3
    state.after(3, 0, max_draft=6)
    state.after(1, 0, max_draft=6)
    assert state.k == 1 and state.cooldown == 2  # failing drafts wait ever longer before trying again


def _request(**params: object) -> Request:
    return Request("r", [0], SamplingParams(**params), max_tokens=16)  # type: ignore[arg-type]


def test_greedy_keeps_the_draft_while_it_is_the_argmax() -> None:
    logits = torch.full((4, 8), -5.0)
    for row, best in enumerate([3, 5, 2, 6]):
        logits[row, best] = 5.0
    req = _request(temperature=0.0)
    got = verify(logits, req, [3, 5, 7])
    assert (got.accepted, got.token_id) == ([3, 5], 2)  # 7 was not the argmax: the model's 2 replaces it
    everything = verify(logits, req, [3, 5, 2])
    assert (everything.accepted, everything.token_id) == ([3, 5, 2], 6)  # all kept, and one more


@pytest.mark.parametrize("params", [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9, "top_k": 4}])
def test_rejection_sampling_keeps_the_models_distribution(params: dict[str, float]) -> None:
    """The first token of a speculative step and a plain draw from the same logits, 6000 times each: their
    frequencies agree within 0.03 (about 3.5 standard deviations at p = 0.5), for a draft the model
    likes and for one it does not; and the token after a kept draft follows the second row."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5], [0.0, 2.5, 0.3, 1.0, 0.2, -0.5]])
    draws = 6000
    plain_req = _request(seed=11, **params)
    plain = Counter(sample(logits[:1].clone(), [plain_req])[0].token_id for _ in range(draws))
    for draft in (0, 4):
        spec_req = _request(seed=7, **params)
        first: Counter[int] = Counter()
        after_kept: Counter[int] = Counter()
        for _ in range(draws):
            got = verify(logits, spec_req, [draft])
            first[got.accepted[0] if got.accepted else got.token_id] += 1
            if got.accepted:
                after_kept[got.token_id] += 1
        for token in range(logits.shape[1]):
            assert abs(first[token] - plain[token]) / draws < 0.03, (draft, token, first, plain)
        if draft == 0:  # often kept: the next token follows the second row's distribution
            second_req = _request(seed=5, **params)
            second = Counter(sample(logits[1:].clone(), [second_req])[0].token_id for _ in range(draws))
            kept = sum(after_kept.values())
            for token in range(logits.shape[1]):
                assert abs(after_kept[token] / kept - second[token] / draws) < 0.04


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    engine = Engine(EngineConfig(speculative="ngram"), progress=False)
    yield LLM(engine=engine)
    engine.shutdown()


def _margins(result: dict[str, object]) -> list[float]:
    steps = result["logprobs"]
    assert isinstance(steps, list)
    return [s["top"][0][1] - s["top"][1][1] for s in steps]


def test_greedy_output_is_the_models_own_up_to_a_near_tie(llm: LLM) -> None:
    scheduler = llm.engine.core.scheduler
    before = scheduler.num_accepted_tokens
    spec = llm.generate(REWRITE, max_tokens=96, temperature=0, logprobs=2)
    assert scheduler.num_accepted_tokens - before > 20  # the drafts were used, not just proposed
    plain = llm.generate(REWRITE, max_tokens=96, temperature=0, logprobs=2, speculative=False)
    agreement = Agreement(SPEC_MARGIN)
    agreement.check(spec["token_ids"], plain["token_ids"], _margins(spec), _margins(plain), what="rewrite")
    agreement.assert_meaningful(0.75)
    assert len(spec["logprobs"]) == spec["completion_tokens"]  # one entry per token, kept drafts too


def test_sampled_and_stopped_requests_end_where_they_should(llm: LLM) -> None:
    sampled = llm.generate(REWRITE, max_tokens=40, temperature=0.7, seed=3, ignore_eos=True)
    assert sampled["completion_tokens"] == 40  # a draft never runs past max_tokens
    stopped = llm.generate(REWRITE, max_tokens=96, temperature=0, stop=["batches"])
    assert "batches" not in stopped["text"] and stopped["finish_reason"] == "stop"
    # a kept draft may run past the stop: the reply ends at the token that completed it, and counts no more
    tokenizer = llm.engine.tokenizer
    assert "batches" in tokenizer.decode(stopped["token_ids"])
    assert "batches" not in tokenizer.decode(stopped["token_ids"][:-1])
    streamed = list(llm.generate_stream(REWRITE, max_tokens=48, temperature=0))
    whole = llm.generate(REWRITE, max_tokens=48, temperature=0)
    assert [t["token_id"] for t in streamed] == whole["token_ids"]  # several tokens a delta, none lost
