"""Grammar masks in the batched sampler: a constrained row draws only what its grammar allows, to the end;
its neighbours in the batch are untouched."""

from __future__ import annotations

import json

import pytest
import torch

from tricklm.engine.request import FinishReason, Request
from tricklm.engine.sampler import sample
from tricklm.engine.sampling_params import SamplingParams
from tricklm.engine.structured import GrammarCompiler, GrammarError, GrammarUnavailable
from tricklm.model.resolve import resolve_model
from tricklm.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["answer", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(resolve_model(None, progress=False))


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer.backend_json, tokenizer.vocab_size, sorted(tokenizer.eos_token_ids))


@pytest.mark.parametrize("seed", range(4))
def test_random_logits_under_a_schema_give_valid_json(
    tokenizer: Tokenizer, compiler: GrammarCompiler, seed: int
) -> None:
    grammar = compiler.json_schema(SCHEMA)
    constrained = Request("c", [1], SamplingParams(grammar=grammar, seed=seed), 64, tokenizer.eos_token_ids)
    free = Request("f", [1], SamplingParams(temperature=0.0), 64, tokenizer.eos_token_ids)
    gen = torch.Generator().manual_seed(seed)
    reason = None
    while reason is None and len(constrained.output_token_ids) < 64:
        logits = torch.randn(2, tokenizer.vocab_size, generator=gen) * 3
        drawn = sample(logits, [constrained, free])
        assert drawn[1].token_id == int(logits[1].argmax())  # the free row's draw is its own
        assert drawn[0].error is None
        assert constrained.matcher.consume_token(drawn[0].token_id)  # as Scheduler.update does
        constrained.output_token_ids.append(drawn[0].token_id)
        reason = constrained.finish_reason_for(drawn[0].token_id)
    assert reason == FinishReason.STOP
    value = json.loads(tokenizer.decode(constrained.output_token_ids))
    assert value["answer"] in ("yes", "no") and 0 <= value["n"] <= 99 and set(value) == {"answer", "n"}


def test_the_same_schema_compiles_once(compiler: GrammarCompiler) -> None:
    assert compiler.json_schema(SCHEMA) is compiler.json_schema(json.loads(json.dumps(SCHEMA)))


@pytest.mark.parametrize(
    "schema",
    [{"type": "nope"}, {"type": "string", "format": "frog"}, {"type": "string", "pattern": "(("}, {"enum": []}],
)
def test_a_schema_that_cannot_be_enforced_is_refused(compiler: GrammarCompiler, schema: dict[str, object]) -> None:
    with pytest.raises(GrammarError):
        compiler.json_schema(schema)


def test_a_grammar_over_a_wider_table_than_the_logits_masks_what_exists(tokenizer: Tokenizer) -> None:
    """A tokenizer with added tokens beyond the model's embedding (32001 against 32000, say)."""
    wide = GrammarCompiler(tokenizer.backend_json, tokenizer.vocab_size + 40, sorted(tokenizer.eos_token_ids))
    req = Request("w", [1], SamplingParams(grammar=wide.json_schema(SCHEMA), temperature=0.0), 8)
    out = sample(torch.randn(1, tokenizer.vocab_size), [req])
    assert out[0].error is None and tokenizer.decode([out[0].token_id]).startswith("{")


def test_the_token_table_is_read_once_on_first_use(tokenizer: Tokenizer) -> None:
    reads: list[int] = []

    def tokenizer_json() -> str:
        reads.append(1)
        return tokenizer.backend_json()

    compiler = GrammarCompiler(tokenizer_json, tokenizer.vocab_size, sorted(tokenizer.eos_token_ids))
    assert reads == []  # a server never asked for a constraint holds no token table
    compiler.json_schema(SCHEMA)
    compiler.lark('start: "yes" | "no"')
    assert reads == [1]


def test_an_unreadable_tokenizer_refuses_every_constraint_with_one_reason() -> None:
    reads: list[int] = []

    def tokenizer_json() -> str:
        reads.append(1)
        return '{"model": {"type": "NoSuchModel"}}'

    compiler = GrammarCompiler(tokenizer_json, 64, [0])
    for _ in range(2):
        with pytest.raises(GrammarUnavailable, match="structured outputs are unavailable for this model's tokenizer"):
            compiler.json_schema(SCHEMA)
    assert reads == [1]  # the failure is remembered, not retried per request
