"""`POST /v1/responses`: OpenAI's Responses API over the same prompt, engine and streaming path as chat
completions; this module renders its output items and its typed events.

A response's `output` is a list of items: `reasoning` (a thinking model's), a `message` with one
`output_text` part, then one `function_call` per call. Streamed, each item is added, filled and done in
turn between `response.created` and `response.completed` (or `response.incomplete` when
`max_output_tokens` cut it), every event numbered, as OpenAI's API sends them and its client checks.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tricklm.engine.output import Delta, OutputProcessor
from tricklm.server.errors import APIError
from tricklm.server.openai.chat import encode_messages, reply_grammar
from tricklm.server.openai.protocol import json_or_text
from tricklm.server.openai.response_store import ResponseStore
from tricklm.server.openai.responses_protocol import ResponsesRequest, chat_dicts
from tricklm.server.openai.tools import ParsedCall, ToolMode, ToolSetup, new_call_id
from tricklm.server.sampling import to_sampling_params
from tricklm.server.serving import Job, Renderer, respond, start_job
from tricklm.server.sse import sse_event
from tricklm.server.state import ServerState
from tricklm.server.thinking import Thinking


async def create_response(body: ResponsesRequest, request: Request, state: ServerState) -> Response:
    client = state.require_engine(body.model)
    chat_tools = [t.as_chat_tool() for t in body.tools or []]
    tools = ToolSetup.of(chat_tools, body.chat_tool_choice(), body.parallel_tool_calls)
    effort = body.reasoning.effort if body.reasoning else None
    thinking = Thinking(body.chat_template_kwargs, effort)
    history = []
    if body.previous_response_id is not None:
        history = state.responses.get(body.previous_response_id, "previous_response_id").conversation
    try:
        conversation = history + chat_dicts(None, body.input)
    except ValueError as e:
        raise APIError(400, str(e), param="input", code="unsupported_content") from None
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    prompt_ids = await encode_messages(client, system + conversation, tools, thinking.kwargs(client, state))
    reasoning = thinking.reasoning(client, state, prompt_ids)
    grammar = await reply_grammar(client, tools, body.response_format())
    params = to_sampling_params(client, body, grammar, reasoning)
    job = start_job(client, [prompt_ids], params, prefix="resp", prompt_param="input")
    renderer = ResponsesRenderer(client.served_name, body, tools)
    if body.store:
        renderer.keep_in(state.responses, conversation)
    return await respond(job, renderer, body.stream, request)


@dataclass
class _Open:
    """The item being streamed: its place in `output`, its kind, and its text so far."""

    index: int
    kind: str
    id: str
    text: str = ""
    call: ParsedCall | None = None


@dataclass
class _Stream:
    items: list[dict[str, Any]] = field(default_factory=list)  # done items, as output_item.done sent them
    open: _Open | None = None
    text: str = ""  # the answer so far (what the tool modes read)
    content_sent: str = ""


class ResponsesRenderer(Renderer):
    done = None  # the stream ends with response.completed (or .incomplete)

    def __init__(self, model: str, body: ResponsesRequest, tools: ToolSetup | None) -> None:
        self.model = model
        self.body = body
        self.tools = tools if tools is not None and tools.mode is not ToolMode.NONE else None
        self.id = "resp_" + uuid.uuid4().hex
        self.created = int(time.time())
        self._sequence = 0
        self._stream = _Stream()
        self._call_ids: list[str] = []
        self._store: ResponseStore | None = None
        self._conversation: list[dict[str, Any]] = []

    def keep_in(self, store: ResponseStore, conversation: list[dict[str, Any]]) -> None:
        """Store the finished response with the conversation (chat messages) that led to it."""
        self._store, self._conversation = store, conversation

    def _finished(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._store is not None:
            self._store.put(body, [*self._conversation, _assistant_turn(body["output"])])
        return body

    # ---- streamed -----------------------------------------------------------------------------------

    def opening(self, job: Job) -> list[bytes]:
        response = self._envelope("in_progress", [], None)
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def delta(self, job: Job, index: int, delta: Delta) -> list[bytes]:
        s = self._stream
        out = self._piece("reasoning", delta.reasoning) if delta.reasoning else []
        s.text += delta.text
        if self.tools is None:
            out += self._piece("message", delta.text)
        elif self.tools.mode is ToolMode.NAMED:
            out += self._piece("function_call", delta.text, ParsedCall(self.tools.name or "", ""))
        elif self.tools.mode is ToolMode.AUTO:
            content = self.tools.streamable_content(s.text)
            out += self._piece("message", content[len(s.content_sent) :])
            s.content_sent = content
        if delta.finish_reason is not None:
            out += self._finish()
        return out

    def closing(self, job: Job) -> list[bytes]:
        proc = job.streams[0].processor
        status, details = _status(proc)
        response = self._finished(self._envelope(status, self._stream.items, _usage(job, proc), details))
        return [self._event(f"response.{status}", response=response)]

    def error_event(self, error: APIError) -> bytes:
        return self._event("error", code=error.code, message=error.message, param=error.param)

    def _finish(self) -> list[bytes]:
        s = self._stream
        if self.tools is None or self.tools.mode is ToolMode.NAMED:
            return self._close()
        content, calls = self.tools.parse(s.text)
        out = self._piece("message", (content or "")[len(s.content_sent) :])
        for k, call in enumerate(calls):
            out += self._close() + self._piece("function_call", call.arguments, call, key=k)
        return out + self._close()

    def _piece(self, kind: str, text: str, call: ParsedCall | None = None, key: int = 0) -> list[bytes]:
        """`text` added to an item of `kind` (opened first if another is open)."""
        if not text:
            return []
        s = self._stream
        out: list[bytes] = []
        if s.open is None or s.open.kind != kind:
            out += self._close()
            out += self._add(kind, call, key)
        assert s.open is not None
        s.open.text += text
        where = {"item_id": s.open.id, "output_index": s.open.index}
        if kind == "reasoning":
            out.append(self._event("response.reasoning_text.delta", **where, content_index=0, delta=text))
        elif kind == "message":
            out.append(self._event("response.output_text.delta", **where, content_index=0, delta=text, logprobs=[]))
        else:
            out.append(self._event("response.function_call_arguments.delta", **where, delta=text))
        return out

    def _add(self, kind: str, call: ParsedCall | None, key: int) -> list[bytes]:
        s = self._stream
        prefix = {"reasoning": "rs_", "message": "msg_", "function_call": "fc_"}[kind]
        s.open = _Open(len(s.items), kind, prefix + uuid.uuid4().hex[:24], call=call)
        item = _item(s.open, "in_progress", self._call_id(key))
        out = [self._event("response.output_item.added", output_index=s.open.index, item=item)]
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": []}
            where = {"item_id": s.open.id, "output_index": s.open.index}
            out.append(self._event("response.content_part.added", **where, content_index=0, part=part))
        return out

    def _close(self) -> list[bytes]:
        s = self._stream
        if s.open is None:
            return []
        opened, s.open = s.open, None
        where = {"item_id": opened.id, "output_index": opened.index}
        call_id = self._call_id(len([i for i in s.items if i["type"] == "function_call"]))
        item = _item(opened, "completed", call_id)
        out = []
        if opened.kind == "reasoning":
            out.append(self._event("response.reasoning_text.done", **where, content_index=0, text=opened.text))
        elif opened.kind == "message":
            out.append(
                self._event("response.output_text.done", **where, content_index=0, text=opened.text, logprobs=[])
            )
            out.append(self._event("response.content_part.done", **where, content_index=0, part=item["content"][0]))
        else:
            out.append(self._event("response.function_call_arguments.done", **where, arguments=opened.text))
        s.items.append(item)
        return [*out, self._event("response.output_item.done", output_index=opened.index, item=item)]

    def _event(self, name: str, **fields: Any) -> bytes:
        self._sequence += 1
        return sse_event({"type": name, "sequence_number": self._sequence - 1, **fields}, name)

    # ---- whole --------------------------------------------------------------------------------------

    def response(self, job: Job, done: list[OutputProcessor]) -> Response:
        proc = done[0]
        items: list[dict[str, Any]] = []
        if proc.reasoning:
            items.append(_item(_Open(0, "reasoning", "rs_" + uuid.uuid4().hex[:24], proc.reasoning), "completed", ""))
        text, calls = proc.text, list[ParsedCall]()
        if self.tools is not None:
            content, calls = self.tools.parse(proc.text)
            text = content or ""
        if text:
            items.append(_item(_Open(len(items), "message", "msg_" + uuid.uuid4().hex[:24], text), "completed", ""))
        for k, call in enumerate(calls):
            opened = _Open(len(items), "function_call", "fc_" + uuid.uuid4().hex[:24], call.arguments, call)
            items.append(_item(opened, "completed", self._call_id(k)))
        status, details = _status(proc)
        return JSONResponse(self._finished(self._envelope(status, items, _usage(job, proc), details)))

    def _envelope(
        self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None, details: Any = None
    ) -> dict[str, Any]:
        b = self.body
        fmt = (
            b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else {"type": "text"}
        )
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
            "usage": usage,
            "error": None,
            "incomplete_details": details,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "temperature": b.temperature,
            "top_p": b.top_p,
            "tools": [t.model_dump(exclude_none=True) for t in b.tools or []],
            "tool_choice": b.tool_choice
            if isinstance(b.tool_choice, str)
            else (b.tool_choice.model_dump() if b.tool_choice else "auto"),
            "parallel_tool_calls": b.parallel_tool_calls,
            "text": {"format": fmt},
            "reasoning": {"effort": b.reasoning.effort if b.reasoning else None, "summary": None},
            "metadata": b.metadata or {},
            "previous_response_id": b.previous_response_id,
            "store": b.store,
        }

    def _call_id(self, k: int) -> str:
        while len(self._call_ids) <= k:
            self._call_ids.append(new_call_id())
        return self._call_ids[k]


def _item(opened: _Open, status: str, call_id: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if opened.kind == "reasoning":
        if status == "completed":
            content = [{"type": "reasoning_text", "text": opened.text}]
        return {"id": opened.id, "type": "reasoning", "summary": [], "content": content}
    if opened.kind == "message":
        if status == "completed":
            content = [{"type": "output_text", "text": opened.text, "annotations": []}]
        return {"id": opened.id, "type": "message", "status": status, "role": "assistant", "content": content}
    assert opened.call is not None
    arguments = opened.text if status == "completed" else ""
    return {
        "id": opened.id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": opened.call.name,
        "arguments": arguments,
    }


def _assistant_turn(output: list[dict[str, Any]]) -> dict[str, Any]:
    """A response's output items as the assistant's chat message (what the next turn's template renders)."""
    turn: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if item["type"] == "message":
            turn["content"] += "".join(part["text"] for part in item["content"])
        elif item["type"] == "reasoning":
            turn["reasoning_content"] = "".join(part["text"] for part in item["content"])
        elif item["type"] == "function_call":
            function = {"name": item["name"], "arguments": json_or_text(item["arguments"])}
            turn.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": function})
    return turn


def _status(proc: OutputProcessor) -> tuple[str, dict[str, str] | None]:
    if proc.finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def _usage(job: Job, proc: OutputProcessor) -> dict[str, Any]:
    output = len(proc.token_ids)
    return {
        "input_tokens": job.prompt_tokens,
        "input_tokens_details": {"cached_tokens": proc.num_cached_tokens},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": proc.reasoning_tokens},
        "total_tokens": job.prompt_tokens + output,
    }
