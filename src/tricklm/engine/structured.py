"""Constrained decoding: grammars compiled by llguidance, applied as a token mask in the batched sampler.

Why llguidance rather than xgrammar (benchmarks/grammar_engines.py; the figures: benchmarks/README.md): both
mask a 16-row step on our tokenizer in a small fraction of a decode step's time; llguidance
is one 8 MB wheel with no dependencies where xgrammar pulls in triton (1 GB) and a TVM runtime, and its
parser bounds its own work per token (lexer fuel, item limits), so no schema can stall the engine thread.

A schema is compiled once (off the engine thread, with a time limit, cached by its text) into a prototype
matcher; each request copies it. Masks are computed on the engine thread right before sampling, so
constrained and free requests share one batch and one forward pass.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tricklm.memory import release_freed_memory

# llguidance itself is imported where a grammar is first compiled: its library stays resident once imported,
# which a server never asked for a constraint does not need
if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions


# Whitespace is where unconstrained JSON goes wrong (ollama#4370): none is allowed but one space after each
# separator, as `json.dumps` writes it, so a model that likes newlines cannot spin on them. Keywords the
# compiler does not implement are errors (not `lenient`): a schema is enforced whole or refused.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 256

logger = logging.getLogger(__name__)


class GrammarError(ValueError):
    """The constraint cannot be compiled or enforced; the message names why (a 400 for the client)."""


class GrammarUnavailable(GrammarError):
    """This model's tokenizer cannot be read by the grammar engine: no constraint can be enforced."""


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint. Plain data for SamplingParams: the prototype is copied, never advanced."""

    description: str
    prototype: Any = field(compare=False, repr=False)
    vocab_size: int = 0  # of the matcher's token table: the width of its masks

    def matcher(self) -> Any:
        return self.prototype.deep_copy()


class GrammarCompiler:
    """Compiles JSON schemas and Lark grammars against one tokenizer; thread-safe, cached by source."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer: Any = None
        self._unavailable: str | None = None  # why the token table could not be built, once known
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Grammar] = OrderedDict()

    def json_schema(self, schema: dict[str, Any] | bool) -> Grammar:
        import llguidance

        try:
            text = json.dumps(schema)  # key order kept: properties are generated in the schema's order
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"the JSON schema cannot be compiled: {e}") from None
        return self._compiled(grammar, "json_schema")

    def lark(self, source: str, description: str = "grammar") -> Grammar:
        import llguidance

        return self._compiled(llguidance.LLMatcher.grammar_from_lark(source), description)

    def _compiled(self, grammar: str, description: str) -> Grammar:
        import llguidance

        with self._lock:
            cached = self._cache.get(grammar)
            if cached is not None:
                self._cache.move_to_end(grammar)
                return cached
        prototype = llguidance.LLMatcher(self.tokenizer(), grammar, log_level=0)
        if prototype.is_error():
            raise GrammarError(f"the {description} cannot be enforced: {prototype.get_error()}")
        warnings = prototype.get_grammar_warnings()
        if warnings:  # a keyword llguidance would ignore: refused, never silently unenforced (vllm#57726)
            raise GrammarError(f"the {description} uses what cannot be enforced: {'; '.join(warnings)}")
        compiled = Grammar(description, prototype, self._vocab_size)
        with self._lock:
            self._cache[grammar] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def tokenizer(self) -> Any:
        """llguidance's token table, built on first use, as vLLM builds its grammar backend: tens of MiB
        resident for a 49k vocabulary (its size and build time: benchmarks/README.md), which a server never
        asked for a constraint does not pay. The build holds the GIL, once."""
        with self._lock:
            if self._unavailable is not None:
                raise GrammarUnavailable(self._unavailable)
            if self._tokenizer is None:
                import llguidance

                try:
                    self._tokenizer = llguidance.LLTokenizer(
                        self._tokenizer_json(), n_vocab=self._vocab_size, eos_token=self._eos or None
                    )
                except (ValueError, RuntimeError, TypeError) as e:
                    self._unavailable = f"structured outputs are unavailable for this model's tokenizer: {e}"
                    logger.warning("%s", self._unavailable)
                    raise GrammarUnavailable(self._unavailable) from None
                finally:
                    release_freed_memory()  # the build's scratch and the tokenizer.json text
            return self._tokenizer


# A row of the step's logits whose request has a grammar: its index, the grammar, and the request's matcher (its
# state in that grammar)
ConstrainedRow = tuple[int, "Grammar", Any]


def mask_logits(logits: torch.Tensor, rows: list[ConstrainedRow]) -> dict[int, str]:
    """Set to -inf, in place, every token each row's grammar does not allow next; return the rows whose
    grammar failed (those rows alone end, with that message)."""
    failed: dict[int, str] = {}
    groups: dict[int, list[ConstrainedRow]] = {}
    for row in rows:  # one group per token table (in practice: one)
        groups.setdefault(row[1].vocab_size, []).append(row)
    for group in groups.values():
        failed |= _mask_group(logits, group)
    return failed


def _mask_group(logits: torch.Tensor, group: list[ConstrainedRow]) -> dict[int, str]:
    grammar = group[0][1]
    width, vocab = grammar.vocab_size, logits.shape[-1]
    words = (width + 31) // 32
    bits = np.zeros((len(group), words), dtype=np.int32)
    failed: dict[int, str] = {}
    for j, (i, _, matcher) in enumerate(group):
        try:
            matcher.unsafe_compute_mask_ptr(bits[j].ctypes.data, bits[j].nbytes)
        except (ValueError, RuntimeError) as e:
            failed[i] = f"the grammar failed: {e}"
    # Bytes of the mask to 8 additive logits each (0 or -inf) by table lookup: an add over the rows costs
    # a fraction of a boolean masked_fill here
    bias = torch.nn.functional.embedding(torch.from_numpy(bits).view(torch.uint8).long(), _BYTE_BIAS)
    bias = bias.view(len(group), -1)[:, :vocab]
    known = bias.shape[1]
    if [row[0] for row in group] == list(range(logits.shape[0])):  # every row constrained: one add, in place
        logits[:, :known].add_(bias)
    else:
        for j, row in enumerate(group):
            logits[row[0], :known].add_(bias[j])
    if known < vocab:  # tokens beyond the grammar's table are never allowed
        logits[[row[0] for row in group], known:] = float("-inf")
    return failed


# Row b: the additive logits of the 8 tokens a mask byte b stands for (bit k set: token allowed)
_BYTE_BIAS = torch.tensor([[0.0 if b >> k & 1 else float("-inf") for k in range(8)] for b in range(256)])
