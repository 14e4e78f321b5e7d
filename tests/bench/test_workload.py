"""Prompt generation and the shipped prompt set."""

from __future__ import annotations

import pytest

from tricklm.bench.workload import (
    WORDS,
    calibration_text,
    load_prompt_set,
    random_prompts,
    real_prompts,
    target_lengths,
)


def test_random_prompts_have_the_target_number_of_words() -> None:
    prompts = random_prompts(5, 40, seed=1)
    assert [p.target_len for p in prompts] == [40] * 5
    assert all(len(p.text.split()) == 40 for p in prompts)
    assert all(word in WORDS for p in prompts for word in p.text.split())
    assert len({p.text for p in prompts}) == 5


def test_random_prompts_are_reproducible_with_a_seed() -> None:
    assert random_prompts(3, 20, 0.5, seed=7) == random_prompts(3, 20, 0.5, seed=7)
    assert random_prompts(3, 20, 0.5, seed=7) != random_prompts(3, 20, 0.5, seed=8)


def test_spread_bounds_the_lengths() -> None:
    import random

    lengths = target_lengths(random.Random(0), 500, 100, 0.2)
    assert min(lengths) >= 80 and max(lengths) <= 120
    assert len(set(lengths)) > 10


def test_tokens_per_word_scales_the_words() -> None:
    prompts = random_prompts(2, 30, tokens_per_word=1.5)
    assert all(len(p.text.split()) == 20 and p.target_len == 30 for p in prompts)


@pytest.mark.parametrize("kwargs", [{"input_len": 0}, {"spread": 1.0}, {"tokens_per_word": 0.0}])
def test_bad_arguments(kwargs: dict[str, float]) -> None:
    args = {"num": 1, "input_len": 10, **kwargs}
    with pytest.raises(ValueError):
        random_prompts(**args)  # type: ignore[arg-type]


def test_calibration_text_has_the_calibration_length() -> None:
    assert len(calibration_text().split()) == 256


def test_shipped_prompt_set() -> None:
    texts = load_prompt_set()
    assert len(texts) >= 40
    assert len(set(texts)) == len(texts)
    assert all(isinstance(t, str) and len(t) > 10 for t in texts)


def test_real_prompts_shuffle_and_repeat() -> None:
    texts = load_prompt_set()
    prompts = real_prompts(len(texts) + 3, seed=0)
    assert [p.text for p in prompts[: len(texts)]] != texts  # shuffled
    assert sorted(p.text for p in prompts[: len(texts)]) == sorted(texts)
    assert [p.text for p in prompts[len(texts) :]] == [p.text for p in prompts[:3]]
    assert all(p.target_len is None for p in prompts)
