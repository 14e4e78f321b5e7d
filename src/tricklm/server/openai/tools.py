"""Tool calling: tools into the prompt, constraints for forced calls, and calls parsed out of the reply.

`tool_choice` decides the mode:
- "none": the tools are shown to the model, and its reply is returned as text;
- "auto": the reply is parsed for calls in the formats models are trained on (Hermes `<tool_call>{...}
  </tool_call>` as Qwen and SmolLM write it, Mistral's `[TOOL_CALLS][...]`, Llama 3's bare JSON object);
  in Hermes form a call is constrained from its `<tool_call>` on (a name among the tools, arguments
  valid for it), the text before it is free;
- "required": the reply is constrained to a JSON array of calls to the given tools, arguments validated
  against each tool's `parameters`;
- a named function: the reply is constrained to that function's arguments.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from tricklm.engine.structured import JSON_OPTIONS
from tricklm.server.openai.protocol import NamedToolChoice, Tool

# Where a call begins in each format; text before the first of them is the reply's content
_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")
_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
# Calls in one forced reply: a small model asked for "one or more" may otherwise add calls until its
# token limit cuts the array, and a cut array is no call at all
MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolMode(enum.Enum):
    """How a request's tools shape its reply (`tool_choice`; the module's docstring says what each does)."""

    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"  # a `{"type": "function", ...}` choice: one call to that function


@dataclass(frozen=True)
class ToolSetup:
    tools: list[Tool]
    mode: ToolMode
    name: str | None = None  # the named function
    parallel: bool = True

    @classmethod
    def of(cls, tools: list[Tool] | None, choice: str | NamedToolChoice | None, parallel: bool) -> ToolSetup | None:
        """From a request's `tools`, `tool_choice` and `parallel_tool_calls` (None without tools)."""
        if not tools:
            return None
        if isinstance(choice, NamedToolChoice):
            return cls(tools, ToolMode.NAMED, choice.function.name, parallel)
        return cls(tools, ToolMode(choice or "auto"), None, parallel)

    @property
    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as HF chat templates take them (OpenAI's shape)."""
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def constraint(self) -> dict[str, Any] | None:
        """The JSON schema a forced call is constrained to, or None when the model may answer freely."""
        if self.mode is ToolMode.NAMED:
            return _parameters(next(t for t in self.tools if t.function.name == self.name))
        if self.mode is not ToolMode.REQUIRED:
            return None
        defs: dict[str, Any] = {}
        calls = []
        for k, t in enumerate(self.tools):
            arguments = _hoist_defs(_parameters(t), f"tool{k}_", defs)
            calls.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": t.function.name}, "arguments": arguments},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        limit = MAX_PARALLEL_CALLS if self.parallel else 1
        schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1, "maxItems": limit}
        if defs:
            schema["$defs"] = defs
        return schema

    def call_grammar(self, special_trigger: bool) -> str:
        """ "auto" in Hermes form: any text, but from `<tool_call>` on, a call to one of the tools with
        arguments valid for it (an llguidance structural tag: the trigger switches the grammar on)."""
        from llguidance import StructTag  # imported on first use, as in engine/structured.py

        tags = [
            StructTag(
                trigger="<tool_call>",
                begin='<tool_call>\n{"name": ' + json.dumps(t.function.name) + ', "arguments": ',
                grammar={**_parameters(t), "x-guidance": JSON_OPTIONS},
                end="}\n</tool_call>",
            )
            for t in self.tools
        ]
        return StructTag.to_grammar(tags, assume_special=special_trigger)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """The reply's content and its calls; a reply with no valid call is all content."""
        if self.mode is ToolMode.NAMED:
            assert self.name is not None
            return None, [ParsedCall(self.name, text)]  # as streamed: the reply is the arguments
        if self.mode is ToolMode.REQUIRED:
            calls = _calls_from_json(text, self.names)
            return (None, calls) if calls else (text, [])
        if self.mode is ToolMode.NONE:
            return text, []
        start = _first_marker(text)
        if start == len(text) and text.lstrip()[:1] in ("{", "["):
            # Llama 3's bare object; Mistral's array once its [TOOL_CALLS] token was dropped as special
            start = 0
        calls = _auto_calls(text[start:], self.names)
        if not calls:
            return text.strip() or None, []
        return text[:start].strip() or None, calls

    def streamable_content(self, text: str) -> str:
        """In "auto" mode, how much of the reply so far is surely content: the text before anything that
                could begin a call (a marker, part of one, or a reply that opens like a JSON object), trimmed as
                `parse` trims it, so that the streamed content adds up to the non-streamed one. A reply that opens
        like JSON is held whole: it may be a call."""
        if text.lstrip()[:1] in ("{", "["):
            return ""
        end = _first_marker(text)
        for marker in _MARKERS:  # a marker's first characters at the very end may be its start
            for k in range(len(marker) - 1, 0, -1):
                if text[:end].endswith(marker[:k]):
                    end -= k
                    break
        return text[:end].strip()


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object"}


def _hoist_defs(schema: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """`schema` without its `$defs`/`definitions`, which move into `defs` under prefixed names, its
    references rewritten to match: nested inside the array of calls, `#/$defs/X` would point nowhere."""
    renames: dict[str, str] = {}
    for key in ("$defs", "definitions"):
        for name in schema.get(key) or {}:
            renames[f"#/{key}/{name}"] = f"#/$defs/{prefix}{name}"
    body = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
    for key in ("$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            defs[prefix + name] = _rewrite_refs(sub, renames)
    rewritten: dict[str, Any] = _rewrite_refs(body, renames)
    return rewritten


def _rewrite_refs(value: Any, renames: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _rewrite_refs(v, renames) for k, v in value.items()}
        ref = value.get("$ref")
        if isinstance(ref, str):
            for old, new in renames.items():
                if ref == old or ref.startswith(old + "/"):
                    out["$ref"] = new + ref[len(old) :]
        return out
    if isinstance(value, list):
        return [_rewrite_refs(v, renames) for v in value]
    return value


def _first_marker(text: str) -> int:
    found = [i for i in (text.find(m) for m in _MARKERS) if i >= 0]
    return min(found, default=len(text))


def _auto_calls(rest: str, names: set[str]) -> list[ParsedCall]:
    if rest.startswith("<tool_call>"):
        calls = [_call(_loads(body), names) for body in _HERMES.findall(rest)]
        return [c for c in calls if c is not None] if all(calls) else []
    if rest.startswith("[TOOL_CALLS]"):
        return _calls_from_json(rest[len("[TOOL_CALLS]") :], names)
    if rest.startswith("<|python_tag|>"):
        return _calls_from_json(rest[len("<|python_tag|>") :], names)
    if rest.lstrip()[:1] in ("{", "["):
        return _calls_from_json(rest, names)
    return []


def _calls_from_json(text: str, names: set[str]) -> list[ParsedCall]:
    value = _loads(text)
    items = value if isinstance(value, list) else [value]
    calls = [_call(item, names) for item in items]
    return [c for c in calls if c is not None] if calls and all(calls) else []


def _call(value: Any, names: set[str]) -> ParsedCall | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string already
        arguments = _loads(arguments)
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _loads(text: str) -> Any:
    try:
        return json.loads(text.strip())
    except ValueError:
        return None


GENERIC_INSTRUCTIONS = (
    'To call a function, write <tool_call>, a new line, {"name": NAME, "arguments": ARGUMENTS} (a JSON '
    "object per its parameters), a new line and </tool_call>. Results come in tool messages. Functions:\n"
)


def generic_tool_messages(messages: list[dict[str, Any]], setup: ToolSetup) -> list[dict[str, Any]]:
    """For a chat template that does not render tools: the tools described in the system message, calls
    and results written in the Hermes format the instructions ask for."""
    listing = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False) for t in setup.tools)
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{GENERIC_INSTRUCTIONS}{listing}"
    else:
        out.insert(0, {"role": "system", "content": GENERIC_INSTRUCTIONS + listing})
    for m in out:
        calls = m.pop("tool_calls", None)
        if calls:
            written = "".join(  # as the "auto" grammar writes a call
                "<tool_call>\n" + json.dumps(c["function"], ensure_ascii=False) + "\n</tool_call>" for c in calls
            )
            m["content"] = (m.get("content") or "") + written
        if m["role"] == "tool":
            m["content"] = f"<tool_response>{m.get('content') or ''}</tool_response>"
            m.pop("tool_call_id", None)
    return out
