"""The sampler: a row that cannot be sampled fails its own request only; extreme settings stay finite."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tricklm.engine.request import Request
from tricklm.engine.sampler import MIN_LOGPROB, NON_FINITE, sample
from tricklm.engine.sampling_params import SamplingParams

VOCAB = 50


def _request(i: int, **params: object) -> Request:
    return Request(f"r{i}", [1, 2, 3], SamplingParams(**params), max_tokens=8)  # type: ignore[arg-type]


def _logits(rows: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0)) * 5


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_non_finite_row_fails_only_its_request(poison: float, temperature: float) -> None:
    logits = _logits(3)
    logits[1, 7] = poison
    reqs = [_request(i, temperature=temperature, seed=i, logprobs=2) for i in range(3)]
    out = sample(logits, reqs)
    assert out[1].error == NON_FINITE
    assert out[0].error is None and out[2].error is None
    if temperature == 0.0:
        assert [out[0].token_id, out[2].token_id] == [int(logits[0].argmax()), int(logits[2].argmax())]


def test_a_row_with_nothing_finite_fails() -> None:
    logits = _logits(2)
    logits[0] = float("-inf")
    out = sample(logits, [_request(0), _request(1)])
    assert out[0].error == NON_FINITE and out[1].error is None


def test_temperature_below_epsilon_is_greedy() -> None:
    logits = _logits(2)
    for t in (1e-300, 5e-324, 1e-6):
        assert SamplingParams(temperature=t).is_greedy
        out = sample(logits, [_request(0, temperature=t), _request(1, temperature=t)])
        assert [o.token_id for o in out] == logits.argmax(dim=-1).tolist()


def test_extreme_valid_penalties_keep_logprobs_finite() -> None:
    logits = _logits(1) * 20  # logits up to ~300
    logits[0, :40] = float("-inf")  # masked tokens, among the top 20: their log probability has no JSON form
    req = _request(0, temperature=1e-5, repetition_penalty=0.01, presence_penalty=2.0, logprobs=20)
    req.output_token_ids = [11, 12, 12]
    bias = {i: -100.0 for i in range(VOCAB)}
    req_bias = Request("b", [1], SamplingParams(logit_bias=bias, logprobs=20), max_tokens=8)
    for out in sample(torch.cat([logits, logits]), [req, req_bias]):
        assert out.error is None and out.logprob is not None
        values = [out.logprob.logprob, *(v for _, v in out.logprob.top)]
        assert all(math.isfinite(v) and v >= MIN_LOGPROB for v in values)


def test_a_top_k_beyond_the_vocabulary_means_no_limit() -> None:
    logits = _logits(2)
    reqs = [_request(0, top_k=2**63, seed=1), _request(1, top_k=3, seed=2)]
    out = sample(logits, reqs)
    assert all(o.error is None for o in out)
    assert out[1].token_id in logits[1].topk(3).indices.tolist()


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": float("nan")},
        {"top_p": float("nan")},
        {"repetition_penalty": 1e-300},
        {"presence_penalty": float("inf")},
        {"logit_bias": {1: float("nan")}},
        {"seed": 2**64},
        {"seed": -(2**63) - 1},
    ],
)
def test_params_that_could_not_be_sampled_are_refused(params: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**params)  # type: ignore[arg-type]


# ---- each parameter changes the distribution as it is defined -------------------------------------

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _draws(params: dict[str, object], logits: torch.Tensor, n: int = 400, output: list[int] | None = None) -> Counter:
    req = _request(0, seed=1234, **params)
    req.output_token_ids = list(output or [])
    return Counter(sample(logits.unsqueeze(0), [req])[0].token_id for _ in range(n))


def test_unfiltered_draws_follow_the_softmax() -> None:
    counts = _draws({}, PROBS.log(), n=4000)
    for token, p in enumerate(PROBS.tolist()):
        assert abs(counts[token] / 4000 - p) < 0.03


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 3}, {0, 1, 2}),
        ({"top_p": 0.7}, {0, 1}),  # 0.5 before token 1, 0.8 before token 2
        ({"top_p": 0.85}, {0, 1, 2}),
        ({"min_p": 0.5}, {0, 1}),  # at least half the top probability (0.25)
        ({"min_p": 0.2}, {0, 1, 2}),
        ({"top_k": 3, "min_p": 0.5}, {0, 1}),
    ],
)
def test_filters_keep_exactly_the_tokens_they_define(params: dict[str, object], allowed: set[int]) -> None:
    counts = _draws(params, PROBS.log())
    assert set(counts) == allowed


def test_a_lower_temperature_sharpens_the_distribution() -> None:
    cold, hot = _draws({"temperature": 0.3}, PROBS.log(), 2000), _draws({"temperature": 3.0}, PROBS.log(), 2000)
    assert cold[0] > 1500 and hot[0] < 900 and hot[3] > cold[3]


def _greedy(params: dict[str, object], logits: list[float], output: list[int], prompt: list[int] | None = None) -> int:
    req = Request("g", prompt or [9], SamplingParams(temperature=0.0, **params), max_tokens=8)  # type: ignore[arg-type]
    req.output_token_ids = output
    return sample(torch.tensor([logits]), [req])[0].token_id


def test_presence_penalty_subtracts_once_per_seen_token() -> None:
    logits = [1.0, 0.9, 0.0, 0.0]
    assert _greedy({"presence_penalty": 0.2}, logits, [0]) == 1
    assert _greedy({"presence_penalty": 0.05}, logits, [0, 0, 0, 0]) == 0  # not by count
    assert _greedy({"presence_penalty": -0.5}, [0.9, 1.0, 0, 0], [0]) == 0  # negative: encourages


def test_frequency_penalty_subtracts_per_occurrence() -> None:
    logits = [1.0, 0.9, 0.0, 0.0]
    assert _greedy({"frequency_penalty": 0.05}, logits, [0]) == 0  # 0.05 < the 0.1 gap
    assert _greedy({"frequency_penalty": 0.05}, logits, [0, 0, 0]) == 1  # 0.15 > 0.1


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    assert _greedy({"repetition_penalty": 1.5}, [2.0, 1.5, 0, 0], [], prompt=[0]) == 1  # 2 / 1.5 < 1.5
    assert _greedy({"repetition_penalty": 1.2}, [2.0, 1.5, 0, 0], [], prompt=[0]) == 0  # 2 / 1.2 > 1.5
    assert _greedy({"repetition_penalty": 2.0}, [-1.0, -1.5, -9, -9], [], prompt=[0]) == 1  # -2 < -1.5


def test_logit_bias_adds_to_the_logit() -> None:
    logits = [1.0, 0.9, 0.0, 0.0]
    assert _greedy({"logit_bias": {3: 1.5}}, logits, []) == 3
    assert _greedy({"logit_bias": {3: 0.5}}, logits, []) == 0
    assert _greedy({"logit_bias": {0: -100.0}}, logits, []) == 1


def test_draws_across_block_edges_follow_the_distribution() -> None:
    """The lookup works in blocks of 256 tokens: mass on each side of a block edge and in a last, partial
    block is drawn in proportion, and a token of probability 0 never is."""
    logits = torch.full((1000,), float("-inf"))
    wanted = {255: 0.4, 256: 0.3, 511: 0.2, 999: 0.1}
    for token, p in wanted.items():
        logits[token] = math.log(p)
    counts = _draws({}, logits, n=4000)
    assert set(counts) == set(wanted)
    for token, p in wanted.items():
        assert abs(counts[token] / 4000 - p) < 0.03


def test_seeded_draws_are_the_same_alone_and_batched() -> None:
    logits = _logits(4) / 3
    alone = [sample(logits[i : i + 1], [_request(i, seed=100 + i)])[0].token_id for i in range(4)]
    batched = [o.token_id for o in sample(logits, [_request(i, seed=100 + i) for i in range(4)])]
    assert alone == batched
