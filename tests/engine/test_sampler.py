"""The sampler: a row that cannot be sampled fails its own request only; extreme settings stay finite."""

from __future__ import annotations

import math

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
