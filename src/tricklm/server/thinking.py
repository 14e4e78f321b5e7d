"""What every chat-like route does for a thinking model: the template's switches, the reasoning budget,
and, once the prompt is rendered, whether the reply begins inside the reasoning (engine/reasoning.py).

A request may set `reasoning_effort` ("none" or "minimal" turn thinking off), a `reasoning_budget` in
tokens (0 turns it off) and `chat_template_kwargs`; the server's `--reasoning-budget` is the default
budget and `--reasoning-format none` returns the reasoning inside the answer, as the model wrote it.
Thinking is turned off through the template's own switch where it has one (Qwen3's `enable_thinking`),
else by a budget of 0, which closes the thinking before its first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tricklm.engine.reasoning import Reasoning
from tricklm.server.engine_client import EngineClient
from tricklm.server.errors import APIError
from tricklm.server.state import ServerState
from tricklm.tokenizer import TEMPLATE_NAMES

Effort = Literal["none", "minimal", "low", "medium", "high"]
_OFF: tuple[str, ...] = ("none", "minimal")


@dataclass(frozen=True)
class Thinking:
    """A request's thinking settings, whichever API it came through."""

    template_kwargs: dict[str, Any] | None = None
    effort: Effort | None = None
    budget: int | None = None  # the request's; None: the server's default

    def resolved_budget(self, state: ServerState) -> int | None:
        if self.budget is not None:
            return self.budget
        if self.effort in _OFF:
            return 0
        return state.reasoning_budget

    def kwargs(self, client: EngineClient, state: ServerState, param: str = "chat_template_kwargs") -> dict[str, Any]:
        """The variables the chat template gets beside the messages."""
        kwargs = dict(self.template_kwargs or {})
        clash = sorted(TEMPLATE_NAMES & kwargs.keys())
        if clash:
            raise APIError(400, f"{param} may not set {', '.join(clash)}: the server sets them", param=param)
        template = client.tokenizer.chat_template or ""
        if "enable_thinking" in template and self.resolved_budget(state) == 0:
            kwargs.setdefault("enable_thinking", False)
        if self.effort is not None:  # templates with effort levels (gpt-oss) read it
            kwargs.setdefault("reasoning_effort", self.effort)
        return kwargs

    def reasoning(self, client: EngineClient, state: ServerState, prompt: list[int]) -> Reasoning | None:
        """How the engine treats this reply's thinking; None when the reply is all answer (the model does
        not think, the template closed the thinking, or the server returns reasoning as content)."""
        tags = client.think_tags
        if tags is None or state.reasoning_format == "none":
            return None
        opened = tags.opened_by(prompt, client.tokenizer)
        if opened is None:
            return None
        return Reasoning(tags, opened, self.resolved_budget(state))
