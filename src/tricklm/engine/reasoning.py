"""Thinking models (Qwen3, the DeepSeek-R1 distills, SmolLM3): the part of a reply between `<think>` and
`</think>` is reasoning, kept apart from the answer.

The tags are single tokens in every such vocabulary, so the split is made on token ids, never on text: a
reply that writes the characters "<think>" in prose is not misread, and nothing is held back waiting for
a tag to complete. The engine uses the same state to close the thinking once its budget is spent (forcing
the closing tag and the template's separator, as llama.cpp's budget does) and to apply a grammar to the
answer only: a JSON schema or a tool call constrains what follows the reasoning, never the reasoning.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tricklm.tokenizer import Tokenizer

START, END = "<think>", "</think>"
# What the templates put between the closing tag and the answer; forced after it when a budget closes it
SEPARATOR = "\n\n"
# How near the prompt's end an opening tag must be for the template to have opened the thinking itself
_PROMPT_TAIL = 6


@dataclass(frozen=True)
class ThinkTags:
    """A model's thinking tags (token ids) and the tokens a budget forces to close the thinking."""

    start_id: int
    end_id: int
    closing: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ThinkTags | None:
        """The tags if this model thinks: both are single tokens and its chat template writes them."""
        template = tokenizer.chat_template or ""
        start, end = tokenizer.token_id(START), tokenizer.token_id(END)
        if start is None or end is None or (START not in template and END not in template):
            return None
        separator = tokenizer.encode(SEPARATOR, add_special_tokens=False)
        return cls(start, end, (end, *separator))

    def opened_by(self, prompt: list[int], tokenizer: Tokenizer) -> bool | None:
        """Whether the rendered prompt leaves the model inside its thinking (True: R1's template, or a
        template that opens `<think>` itself), closed it already (None: Qwen3 with `enable_thinking` false
        writes `<think>\n\n</think>`, so this reply will not think), or leaves it to the model (False)."""
        tail = prompt[-_PROMPT_TAIL:]
        if self.start_id not in tail:
            return False
        after = tail[len(tail) - tail[::-1].index(self.start_id) :]
        if self.end_id in after:
            return None
        return not tokenizer.decode(after, skip_special_tokens=False).strip()


@dataclass(frozen=True)
class Reasoning:
    """A request's thinking settings (plain data for SamplingParams)."""

    tags: ThinkTags
    opened: bool  # the prompt opened the thinking: the reply begins inside it
    budget: int | None = None  # reasoning tokens before the closing tag is forced; None: no limit


class Part(enum.Enum):
    """What a token of a thinking model's reply is."""

    ANSWER = "answer"
    THOUGHT = "thought"
    MARKUP = "markup"  # a tag, or the separator a budget forced after the closing one


@dataclass
class ReasoningState:
    """Where one request's reply is: before, inside or after its thinking, and what is being forced."""

    spec: Reasoning
    inside: bool = False
    decided: bool = False  # the first token is the only one that may open the thinking
    tokens: int = 0  # reasoning tokens so far, the tags included
    forced: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.inside = self.decided = self.spec.opened
        self._force_if_spent()

    @property
    def may_open(self) -> bool:
        """The next token may be the opening tag (a grammar must leave it allowed)."""
        return not self.decided

    @property
    def constrains(self) -> bool:
        """Whether a grammar applies to the next token: the answer has begun, nothing is being forced."""
        return self.decided and not self.inside and not self.forced

    def next_forced(self) -> int | None:
        return self.forced[0] if self.forced else None

    def advance(self, token_id: int) -> Part:
        """Take the committed token and say what it is (a grammar sees only the answer's tokens)."""
        tags = self.spec.tags
        if self.forced:
            self.forced.pop(0)
            if self.inside and token_id == tags.end_id:
                self.inside = False
                self.tokens += 1
            return Part.MARKUP
        if not self.decided:
            self.decided = True
            if token_id == tags.start_id:
                self.inside = True
                self.tokens = 1
                self._force_if_spent()
                return Part.MARKUP
        if not self.inside:
            return Part.ANSWER
        self.tokens += 1
        if token_id == tags.end_id:
            self.inside = False
            return Part.MARKUP
        self._force_if_spent()
        return Part.THOUGHT

    def _force_if_spent(self) -> None:
        budget = self.spec.budget
        # the opening tag does not count against the budget
        spent = self.tokens - (0 if self.spec.opened else 1)
        if self.inside and not self.forced and budget is not None and spent >= budget:
            self.forced = list(self.spec.tags.closing)
