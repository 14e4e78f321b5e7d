"""The reasoning state machine: what each token of a thinking model's reply is, and what a budget forces."""

from __future__ import annotations

import pytest

from tiny_models import QWEN3_STYLE_TEMPLATE, R1_STYLE_TEMPLATE, make_thinking_model, make_tiny_model
from tricklm.engine.reasoning import Part, Reasoning, ReasoningState, ThinkTags
from tricklm.tokenizer import Tokenizer

TAGS = ThinkTags(start_id=100, end_id=101, closing=(101, 7, 7))
WORD = 5


def parts(state: ReasoningState, tokens: list[int]) -> list[Part]:
    return [state.advance(t) for t in tokens]


def test_a_reply_opened_by_the_prompt_is_thought_until_the_closing_tag() -> None:
    state = ReasoningState(Reasoning(TAGS, opened=True))
    assert state.inside and not state.constrains
    assert parts(state, [WORD, WORD, 101, WORD]) == [Part.THOUGHT, Part.THOUGHT, Part.MARKUP, Part.ANSWER]
    assert state.tokens == 3 and state.constrains


def test_only_the_first_token_may_open_the_thinking() -> None:
    opened = ReasoningState(Reasoning(TAGS, opened=False))
    assert opened.may_open
    assert parts(opened, [100, WORD, 101, WORD]) == [Part.MARKUP, Part.THOUGHT, Part.MARKUP, Part.ANSWER]
    assert opened.tokens == 3
    plain = ReasoningState(Reasoning(TAGS, opened=False))
    assert parts(plain, [WORD, 100, 101]) == [Part.ANSWER] * 3  # tags in an answer are the answer's text
    assert plain.tokens == 0


def test_a_spent_budget_forces_the_closing_tag_and_separator() -> None:
    state = ReasoningState(Reasoning(TAGS, opened=True, budget=2))
    assert parts(state, [WORD, WORD]) == [Part.THOUGHT, Part.THOUGHT]
    forced = []
    while (token := state.next_forced()) is not None:
        forced.append(token)
        assert state.advance(token) is Part.MARKUP
    assert forced == [101, 7, 7]
    assert state.tokens == 3 and state.constrains
    assert state.advance(WORD) is Part.ANSWER


def test_a_budget_of_zero_closes_the_thinking_before_it_begins() -> None:
    opened = ReasoningState(Reasoning(TAGS, opened=True, budget=0))
    assert opened.next_forced() == 101
    model_opened = ReasoningState(Reasoning(TAGS, opened=False, budget=0))
    assert model_opened.next_forced() is None
    model_opened.advance(100)
    assert model_opened.next_forced() == 101  # the opening tag is not counted against the budget


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tokenizer]:
    root = tmp_path_factory.mktemp("thinking")
    return {
        "r1": Tokenizer(make_thinking_model(root / "r1", R1_STYLE_TEMPLATE)),
        "qwen3": Tokenizer(make_thinking_model(root / "qwen3", QWEN3_STYLE_TEMPLATE)),
        "plain": Tokenizer(make_tiny_model(root / "plain", "LlamaForCausalLM")),
    }


def test_tags_are_found_only_where_the_template_writes_them(tokenizers: dict[str, Tokenizer]) -> None:
    tags = ThinkTags.of(tokenizers["r1"])
    assert tags is not None
    tok = tokenizers["r1"]
    assert tok.decode([tags.start_id], skip_special_tokens=False) == "<think>"
    assert tok.decode(list(tags.closing), skip_special_tokens=False) == "</think>\n\n"
    assert ThinkTags.of(tokenizers["plain"]) is None  # no tags in its vocabulary or template


def test_who_opens_the_thinking_is_read_from_the_prompt(tokenizers: dict[str, Tokenizer]) -> None:
    chat = [{"role": "user", "content": "Say <think> once."}]  # the user's tag is far from the prompt's end
    r1, qwen3 = tokenizers["r1"], tokenizers["qwen3"]
    r1_tags, qwen3_tags = ThinkTags.of(r1), ThinkTags.of(qwen3)
    assert r1_tags is not None and qwen3_tags is not None
    assert r1_tags.opened_by(r1.encode_chat(chat), r1) is True
    assert qwen3_tags.opened_by(qwen3.encode_chat(chat), qwen3) is False
    off = qwen3.encode_chat(chat, template_kwargs={"enable_thinking": False})
    assert qwen3_tags.opened_by(off, qwen3) is None
