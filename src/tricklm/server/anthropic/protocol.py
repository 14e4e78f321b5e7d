"""Request bodies of Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`).

As Anthropic's API: `max_tokens` is required, `temperature` is in [0, 1], content is a string or a list
of typed blocks. Unknown fields are ignored, as the OpenAI routes do; a block type this server cannot
read (an image, a document) is refused by name, never dropped.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tricklm.server.openai.protocol import FunctionDefinition, Tool


class AnthropicBody(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextBlock(AnthropicBody):
    type: Literal["text"]
    text: str


class ToolUseBlock(AnthropicBody):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(AnthropicBody):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False


class ThinkingBlock(AnthropicBody):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(AnthropicBody):
    type: Literal["redacted_thinking"]
    data: str


class OtherBlock(AnthropicBody):
    """Any other block type (image, document, search result): read, then refused by name."""

    model_config = ConfigDict(extra="allow")
    type: str

    @field_validator("type")
    @classmethod
    def _unknown(cls, value: str) -> str:
        if value in _KNOWN_BLOCKS:  # a known block with a field missing: its own error says which
            raise ValueError(f"a {value!r} block is missing a field")
        return value


_KNOWN_BLOCKS = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


Block = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class Message(AnthropicBody):
    role: Literal["user", "assistant"]
    content: str | list[Block | OtherBlock]


class AnthropicTool(AnthropicBody):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None  # "custom", or a server tool's type (web search...), which this server has not

    def as_openai(self) -> Tool:
        return Tool(
            type="function",
            function=FunctionDefinition(name=self.name, description=self.description, parameters=self.input_schema),
        )


class ToolChoice(AnthropicBody):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _tool_has_a_name(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs the tool's name")
        return self


class ThinkingConfig(AnthropicBody):
    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = Field(None, ge=0)


class CountTokensRequest(AnthropicBody):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None

    @model_validator(mode="after")
    def _known_tools(self) -> CountTokensRequest:
        names = {t.name for t in self.tools or []}
        for tool in self.tools or []:
            if tool.type not in (None, "custom"):
                raise ValueError(f"tool {tool.name!r} is a server tool ({tool.type}), which this server does not run")
        choice = self.tool_choice
        if choice is not None and choice.type in ("any", "tool") and not names:
            raise ValueError("tool_choice asks for a tool call, but no tools are given")
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not among the tools")
        return self


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    ignore_eos: bool = False  # an extension (as on the OpenAI routes): benchmarks ask for fixed lengths

    def sampling_values(self) -> dict[str, Any]:
        return {
            "ignore_eos": self.ignore_eos,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": tuple(self.stop_sequences or ()),
        }


def chat_dicts(system: str | list[TextBlock] | None, messages: list[Message]) -> list[dict[str, Any]]:
    """Anthropic's conversation as chat templates take it: the system prompt first, a user turn's tool
    results as tool messages (before its text, as Anthropic orders them), an assistant turn's tool uses
    as its tool calls and its thinking as `reasoning_content`."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _text(system)})
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        for block in m.content:
            if isinstance(block, OtherBlock):
                raise ValueError(f"content blocks of type {block.type!r} are not supported (text and tools only)")
        if m.role == "user":
            out += _user_turn(m.content)
        else:
            out.append(_assistant_turn(m.content))
    return out


def _user_turn(blocks: list[Any]) -> list[dict[str, Any]]:
    turn: list[dict[str, Any]] = []
    for block in blocks:
        if isinstance(block, ToolResultBlock):
            text = _text(block.content) if block.content is not None else ""
            turn.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": text})
    text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
    if text or not turn:
        turn.append({"role": "user", "content": text})
    return turn


def _assistant_turn(blocks: list[Any]) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(b.text for b in blocks if isinstance(b, TextBlock)),
    }
    thinking = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
    if thinking:
        message["reasoning_content"] = thinking
    calls = [
        {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
        for b in blocks
        if isinstance(b, ToolUseBlock)
    ]
    if calls:
        message["tool_calls"] = calls
    return message


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content)


def tool_input(arguments: str) -> dict[str, Any]:
    """A parsed call's arguments (JSON text) as Anthropic's `input` object."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
