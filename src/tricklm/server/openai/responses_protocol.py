"""Request body of OpenAI's Responses API (`POST /v1/responses`).

Input items become chat messages (after the stored conversation of `previous_response_id`, if named);
function tools, `tool_choice` and `text.format` become what chat completions use.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tricklm.engine.sampling_params import SEED_RANGE
from tricklm.server.openai.protocol import (
    FunctionDefinition,
    JSONSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    OpenAIBody,
    ResponseFormat,
    Tool,
    json_or_text,
)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class InputItem(BaseModel):
    """A message (`role` + `content`), a `function_call`, its `function_call_output`, or a `reasoning` item."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _complete(self) -> InputItem:
        needs = {
            "message": ("role",),
            "function_call": ("call_id", "name", "arguments"),
            "function_call_output": ("call_id", "output"),
            "reasoning": (),
        }[self.type]
        missing = [f for f in needs if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.type!r} input item needs {', '.join(missing)}")
        return self


class FunctionTool(BaseModel):
    type: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _a_function(self) -> FunctionTool:
        if self.type != "function":
            raise ValueError(f"tools of type {self.type!r} are not supported (function tools only)")
        if self.name is None:
            raise ValueError("a function tool needs a name")
        return self

    def as_chat_tool(self) -> Tool:
        definition = FunctionDefinition(
            name=self.name or "", description=self.description, parameters=self.parameters, strict=self.strict
        )
        return Tool(type="function", function=definition)


class FunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    def as_response_format(self) -> ResponseFormat:
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        schema = JSONSchemaFormat(name=self.name or "response", schema=self.schema_ or {})
        return ResponseFormat(type="json_schema", json_schema=schema)


class TextConfig(BaseModel):
    format: TextFormat | None = None


class ReasoningConfig(BaseModel):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None


class ResponsesRequest(OpenAIBody):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    store: bool = True  # kept in memory, bounded (response_store.py), as OpenAI's API stores by default
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    ignore_eos: bool = False  # an extension (as on the other routes): benchmarks ask for fixed lengths

    @model_validator(mode="after")
    def _consistent(self) -> ResponsesRequest:
        choice = self.tool_choice
        names = {t.name for t in self.tools or []}
        if (choice == "required" or isinstance(choice, FunctionChoice)) and not names:
            raise ValueError("tool_choice asks for a tool call, but no tools are given")
        if isinstance(choice, FunctionChoice) and choice.name not in names:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not among the tools")
        return self

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: str | list[InputItem]) -> str | list[InputItem]:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be empty")
        return value

    def sampling_values(self) -> dict[str, Any]:
        return {
            "ignore_eos": self.ignore_eos,
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
        }

    def chat_tool_choice(self) -> Literal["none", "auto", "required"] | NamedToolChoice | None:
        if isinstance(self.tool_choice, FunctionChoice):
            return NamedToolChoice(type="function", function=NamedFunction(name=self.tool_choice.name))
        return self.tool_choice

    def response_format(self) -> ResponseFormat | None:
        return self.text.format.as_response_format() if self.text and self.text.format else None


def chat_dicts(instructions: str | None, items: str | list[InputItem]) -> list[dict[str, Any]]:
    """The input as chat templates take it: instructions as the system message, a function call as its
    assistant turn's tool call (consecutive calls in one turn), its output as a tool message."""
    out: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return [*out, {"role": "user", "content": items}]
    for item in items:
        if item.type == "message":
            out.append({"role": item.role, "content": _text(item.content)})
        elif item.type == "function_call":
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": json_or_text(item.arguments or "")},
            }
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif item.type == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
        # reasoning items are the model's own past thinking: templates drop it from earlier turns
    return out


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.type not in ("input_text", "output_text", "text") or part.text is None:
            raise ValueError(f"content parts of type {part.type!r} are not supported (text only)")
    return "".join(part.text or "" for part in content)
