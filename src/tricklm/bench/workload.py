"""What to send: random prompts of about `input_len` tokens, or the small real-prompt set shipped in `data/`.

Random prompts are drawn from common English words that each encode as one token (with their leading
space) in the usual BPE tokenizers (GPT-2, Llama, SmolLM2); when the server can count tokens, the number
of words per prompt is scaled by the measured tokens per word.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources

_WORD_TEXT = """
the of and to in is was for that with as on by at from his her it an are were which be this have has had not but
what all when we there can one would their been if more will other new some time could them these two may first
then do any like my now over such our man me even most made after also did many before must through back years
where much your way well down should because each just those people how too little state good very make world still
own see men work long get here between both life being under never day same another know while last might us great
old year off come since against go came right used take three small house water light sea river city town road tree
stone field hill garden school book letter story song music bird fish horse dog cat food bread milk fruit table
chair door window room wall floor fire wind rain snow sun moon star sky cloud morning evening night summer winter
spring autumn week hour minute friend family mother father child king queen army ship train car bridge market island
forest mountain valley lake village country power money price number paper color voice word name idea plan game
team group line point side hand head eye face heart mind body blue green red white black dark bright warm cold quiet
open simple strong young early late happy free clear full real best
"""
WORDS = _WORD_TEXT.split()

CALIBRATION_WORDS = 256


@dataclass(frozen=True)
class Prompt:
    text: str
    target_len: int | None = None  # intended prompt tokens (random prompts only)
    texts: tuple[str, ...] = ()  # an embeddings or rerank request's texts (`text` is the first)


def random_words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def calibration_text(seed: int = 0) -> str:
    """A sample of `CALIBRATION_WORDS` words whose token count gives the tokenizer's tokens per word."""
    return random_words(random.Random(seed), CALIBRATION_WORDS)


def target_lengths(rng: random.Random, num: int, input_len: int, spread: float) -> list[int]:
    """`num` lengths drawn uniformly from input_len × [1 − spread, 1 + spread], each at least 1."""
    if input_len < 1 or not 0 <= spread < 1:
        raise ValueError("input_len must be at least 1 and spread in [0, 1)")
    low, high = round(input_len * (1 - spread)), round(input_len * (1 + spread))
    return [max(1, rng.randint(low, high)) for _ in range(num)]


def random_prompts(
    num: int, input_len: int, spread: float = 0.0, seed: int = 0, tokens_per_word: float = 1.0
) -> list[Prompt]:
    """Prompts of about `input_len` tokens (± spread); `tokens_per_word` comes from calibration."""
    if tokens_per_word <= 0:
        raise ValueError("tokens_per_word must be positive")
    rng = random.Random(seed)
    lengths = target_lengths(rng, num, input_len, spread)
    return [Prompt(random_words(rng, max(1, round(n / tokens_per_word))), n) for n in lengths]


# The shipped prompt sets (data/, Apache-2.0, written for tricklm): free-form requests, and tasks whose
# answer repeats much of their input (rewrite, summarize, fix this text or code)
PROMPT_SETS = {"prompts": "prompts.jsonl", "rewrite": "rewrite.jsonl"}


def load_prompt_set(name: str = "prompts") -> list[str]:
    """A shipped prompt set's prompts."""
    text = resources.files("tricklm.bench").joinpath("data", PROMPT_SETS[name]).read_text("utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def real_prompts(num: int, seed: int = 0, name: str = "prompts") -> list[Prompt]:
    """`num` prompts from a shipped set, shuffled with `seed` and repeated when `num` exceeds it."""
    texts = load_prompt_set(name)
    random.Random(seed).shuffle(texts)
    return [Prompt(texts[i % len(texts)]) for i in range(num)]
