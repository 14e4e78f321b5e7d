"""`--quantization` names and the `WeightFormat` each means."""

from __future__ import annotations

import pytest

from tricklm.model.weights.modes import QUANTIZATIONS, RETIRED, WeightFormat, weight_format


def test_auto_is_the_files_own_types_for_gguf_and_int4_for_a_folder() -> None:
    assert weight_format("auto", gguf=True) is WeightFormat.GGUF
    assert weight_format("auto", gguf=False) is WeightFormat.INT4
    assert weight_format(WeightFormat.Q4_K, gguf=False) is WeightFormat.Q4_K
    with pytest.raises(ValueError, match=r"pass a \.gguf model"):
        weight_format("gguf", gguf=False)
    with pytest.raises(ValueError, match=r"pass a \.gguf model"):
        weight_format(WeightFormat.GGUF, gguf=False)


def test_every_choice_but_auto_is_a_format_and_retired_names_are_not_choices() -> None:
    assert {weight_format(name, gguf=True) for name in QUANTIZATIONS[1:]} == set(WeightFormat)
    assert not set(RETIRED) & set(QUANTIZATIONS)
    for name in RETIRED:
        with pytest.raises(ValueError, match=f"{name} was retired"):
            weight_format(name, gguf=True)


def test_what_each_format_implies() -> None:
    blocks = {f for f in WeightFormat if f.blocks}
    assert blocks == {WeightFormat.GGUF, WeightFormat.Q4_0, WeightFormat.Q4_1, WeightFormat.Q4_K, WeightFormat.Q8_0}
    assert {f for f in WeightFormat if f.rounds} == blocks - {WeightFormat.GGUF}
    assert {f for f in WeightFormat if f.prefill_copy} == {WeightFormat.INT4}
    assert {f for f in WeightFormat if not f.compact} == {WeightFormat.NONE}
    assert WeightFormat.GGUF.rounding == "q8_0" and WeightFormat.Q4_K.rounding == "q4_k"
    with pytest.raises(ValueError, match="keeps no blocks"):
        _ = WeightFormat.INT4.rounding
