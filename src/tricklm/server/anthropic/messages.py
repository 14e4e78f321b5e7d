"""`POST /v1/messages`: Anthropic's Messages API over the same engine, prompt path and streaming path as
chat completions; this module is the protocol's renderer (its content blocks and its event sequence).

A reply is a list of blocks: `thinking` (a thinking model's reasoning), `text`, then one `tool_use` per
call. Streamed, each block is opened, filled with deltas and closed in turn, between `message_start`
and `message_delta` + `message_stop`, exactly as Anthropic's API sends them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tricklm.engine.output import Delta, OutputProcessor
from tricklm.server.anthropic.protocol import CountTokensRequest, MessagesRequest, chat_dicts, tool_input
from tricklm.server.errors import APIError
from tricklm.server.openai.chat import encode_messages, reply_grammar
from tricklm.server.openai.tools import ParsedCall, ToolMode, ToolSetup
from tricklm.server.sampling import to_sampling_params
from tricklm.server.serving import Job, Renderer, respond, start_job
from tricklm.server.sse import sse_event
from tricklm.server.state import ServerState
from tricklm.server.thinking import Thinking

_MODES = {"auto": ToolMode.AUTO, "any": ToolMode.REQUIRED, "tool": ToolMode.NAMED, "none": ToolMode.NONE}


async def create_message(body: MessagesRequest, request: Request, state: ServerState) -> Response:
    client = state.require_engine(body.model)
    tools = tool_setup(body)
    thinking = thinking_of(body)
    prompt_ids = await _prompt(body, state, tools, thinking)
    reasoning = thinking.reasoning(client, state, prompt_ids)
    params = to_sampling_params(client, body, await reply_grammar(client, tools, None), reasoning)
    job = start_job(client, [prompt_ids], params, prefix="msg", prompt_param="messages")
    return await respond(job, MessagesRenderer(client.served_name, tools), body.stream, request)


async def count_tokens(body: CountTokensRequest, state: ServerState) -> JSONResponse:
    """What the template renders for these messages, tools and thinking settings, in tokens."""
    ids = await _prompt(body, state, tool_setup(body), thinking_of(body))
    return JSONResponse({"input_tokens": len(ids)})


async def _prompt(
    body: CountTokensRequest, state: ServerState, tools: ToolSetup | None, thinking: Thinking
) -> list[int]:
    client = state.require_engine(body.model)
    try:
        messages = chat_dicts(body.system, body.messages)
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="unsupported_content") from None
    return await encode_messages(client, messages, tools, thinking.kwargs(client, state, "thinking"))


def tool_setup(body: CountTokensRequest) -> ToolSetup | None:
    if not body.tools:
        return None
    choice = body.tool_choice
    mode = _MODES[choice.type] if choice is not None else ToolMode.AUTO
    name = choice.name if choice is not None and mode is ToolMode.NAMED else None
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    return ToolSetup([t.as_openai() for t in body.tools], mode, name, parallel)


def thinking_of(body: CountTokensRequest) -> Thinking:
    """Anthropic's `thinking`: "disabled" turns it off, "enabled" with `budget_tokens` bounds it; left out,
    a thinking model thinks as the server's defaults say (a local model is not Claude, whose default is off)."""
    if body.thinking is None:
        return Thinking()
    if body.thinking.type == "disabled":
        return Thinking(budget=0)
    return Thinking(budget=body.thinking.budget_tokens)


def stop_reason(proc: OutputProcessor, calls: list[ParsedCall]) -> tuple[str | None, str | None]:
    """Anthropic's `stop_reason` and `stop_sequence` for a finished reply."""
    if proc.finish_reason == "length":
        return "max_tokens", None
    if proc.stop_string is not None:
        return "stop_sequence", proc.stop_string
    if calls:
        return "tool_use", None
    return ("end_turn" if proc.finish_reason is not None else None), None


@dataclass
class _Reply:
    """The streamed reply so far: the open block and what the tool modes hold back."""

    index: int = -1
    open: str | None = None
    text: str = ""
    content_sent: str = ""
    calls: tuple[ParsedCall, ...] = ()


class MessagesRenderer(Renderer):
    done = None  # Anthropic's stream ends with message_stop

    def __init__(self, model: str, tools: ToolSetup | None) -> None:
        self.model = model
        self.tools = tools if tools is not None and tools.mode is not ToolMode.NONE else None
        self.id = "msg_" + uuid.uuid4().hex[:24]
        self._reply = _Reply()
        self._call_ids: list[str] = []

    # ---- streamed -----------------------------------------------------------------------------------

    def opening(self, job: Job) -> list[bytes]:
        message = {**self._envelope(), "content": [], "stop_reason": None, "stop_sequence": None}
        message["usage"] = {"input_tokens": job.prompt_tokens, "output_tokens": 0, "cache_read_input_tokens": 0}
        return [_event("message_start", message=message), _event("ping")]

    def delta(self, job: Job, index: int, delta: Delta) -> list[bytes]:
        reply = self._reply
        out = []
        if delta.reasoning:
            out += self._block("thinking", {"thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": delta.reasoning}))
        reply.text += delta.text
        if self.tools is None:
            out += self._text(delta.text)
        elif self.tools.mode is ToolMode.NAMED:
            out += self._named(delta.text)
        elif self.tools.mode is ToolMode.AUTO:
            content = self.tools.streamable_content(reply.text)
            out += self._text(content[len(reply.content_sent) :])
            reply.content_sent = content
        if delta.finish_reason is not None:
            out += self._finish()
        return out

    def closing(self, job: Job) -> list[bytes]:
        proc = job.streams[0].processor
        reason, sequence = stop_reason(proc, list(self._reply.calls))
        usage = {"output_tokens": len(proc.token_ids), **self._input_usage(job, proc)}
        return [
            _event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence}, usage=usage),
            _event("message_stop"),
        ]

    def error_event(self, error: APIError) -> bytes:
        return sse_event(error.anthropic_body(), "error")

    def _text(self, text: str) -> list[bytes]:
        if not text:
            return []
        return [*self._block("text", {"text": ""}), self._delta({"type": "text_delta", "text": text})]

    def _named(self, text: str) -> list[bytes]:
        """A forced call streams as it is generated: the reply is the call's input."""
        assert self.tools is not None and self.tools.name is not None
        out = self._block("tool_use", {"id": self._call_id(0), "name": self.tools.name, "input": {}})
        return out + ([self._delta({"type": "input_json_delta", "partial_json": text})] if text else [])

    def _finish(self) -> list[bytes]:
        reply = self._reply
        if self.tools is None:
            return self._close()
        if self.tools.mode is ToolMode.NAMED:
            reply.calls = (ParsedCall(self.tools.name or "", reply.text),)
            return self._close()
        content, calls = self.tools.parse(reply.text)
        reply.calls = tuple(calls)
        out = self._text((content or "")[len(reply.content_sent) :])
        for k, call in enumerate(calls):
            out += self._block(f"tool_use:{k}", {"id": self._call_id(k), "name": call.name, "input": {}})
            out.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments}))
        return out + self._close()

    def _block(self, kind: str, fields: dict[str, Any]) -> list[bytes]:
        """Events that make `kind` the open block: the open one closed, the new one started."""
        reply = self._reply
        if reply.open == kind:
            return []
        out = self._close()
        reply.index += 1
        reply.open = kind
        block = {"type": kind.split(":")[0], **fields}
        return [*out, _event("content_block_start", index=reply.index, content_block=block)]

    def _close(self) -> list[bytes]:
        reply = self._reply
        if reply.open is None:
            return []
        reply.open = None
        return [_event("content_block_stop", index=reply.index)]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", index=self._reply.index, delta=delta)

    # ---- whole --------------------------------------------------------------------------------------

    def response(self, job: Job, done: list[OutputProcessor]) -> Response:
        proc = done[0]
        content: list[dict[str, Any]] = []
        if proc.reasoning:
            content.append({"type": "thinking", "thinking": proc.reasoning, "signature": ""})
        text, calls = self._parsed(proc.text)
        if text:
            content.append({"type": "text", "text": text})
        for k, call in enumerate(calls):
            content.append(
                {"type": "tool_use", "id": self._call_id(k), "name": call.name, "input": tool_input(call.arguments)}
            )
        reason, sequence = stop_reason(proc, calls)
        usage = {"output_tokens": len(proc.token_ids), **self._input_usage(job, proc)}
        body = {
            **self._envelope(),
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage,
        }
        return JSONResponse(body)

    def _parsed(self, text: str) -> tuple[str, list[ParsedCall]]:
        if self.tools is None:
            return text, []
        content, calls = self.tools.parse(text)
        return content or "", calls

    def _envelope(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model}

    def _call_id(self, k: int) -> str:
        while len(self._call_ids) <= k:
            self._call_ids.append("toolu_" + uuid.uuid4().hex[:24])
        return self._call_ids[k]

    @staticmethod
    def _input_usage(job: Job, proc: OutputProcessor) -> dict[str, int]:
        """Anthropic counts prompt tokens read from the cache apart from the rest of the input."""
        cached = proc.num_cached_tokens
        return {
            "input_tokens": job.prompt_tokens - cached,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
        }


def _event(name: str, **fields: Any) -> bytes:
    return sse_event({"type": name, **fields}, name)
