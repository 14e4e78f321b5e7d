"""`POST /v1/chat/completions`: messages in, an assistant message out (text or tool calls)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from tricklm.engine.output import Delta, OutputProcessor
from tricklm.engine.structured import Grammar
from tricklm.server.engine_client import EngineClient
from tricklm.server.errors import APIError
from tricklm.server.openai.protocol import ChatCompletionRequest, ChatMessage, ResponseFormat, message_dicts
from tricklm.server.openai.serving import (
    OpenAIRenderer,
    chat_logprobs,
    check_supported,
    response_grammar,
)
from tricklm.server.openai.tools import ParsedCall, ToolMode, ToolSetup, generic_tool_messages, new_call_id
from tricklm.server.sampling import to_sampling_params
from tricklm.server.serving import Job, respond, start_job
from tricklm.server.state import ServerState
from tricklm.server.thinking import Thinking
from tricklm.tokenizer import Tokenizer


async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: ServerState) -> Response:
    client = state.require_engine(body.model)
    check_supported(body)
    tools = ToolSetup.of(body.tools, body.tool_choice, body.parallel_tool_calls)
    thinking = Thinking(body.chat_template_kwargs, body.reasoning_effort, body.reasoning_budget)
    messages = chat_messages(body.messages)
    kwargs = thinking.kwargs(client, state)
    prompt_ids = await encode_messages(client, messages, tools, kwargs, body.add_generation_prompt)
    reasoning = thinking.reasoning(client, state, prompt_ids)
    params = to_sampling_params(client, body, await reply_grammar(client, tools, body.response_format), reasoning)
    job = start_job(client, [prompt_ids], params, body.n, prefix="chat", prompt_param="messages")
    shows_reasoning = reasoning is not None and body.include_reasoning
    renderer = ChatRenderer(client.served_name, client.tokenizer, body.include_usage, tools, shows_reasoning)
    renderer.fingerprint = client.system_fingerprint
    return await respond(job, renderer, body.stream, request)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    try:
        return message_dicts(messages)
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="unsupported_content") from None


async def encode_messages(
    client: EngineClient,
    messages: list[dict[str, Any]],
    tools: ToolSetup | None,
    kwargs: dict[str, Any],
    add_generation_prompt: bool = True,
) -> list[int]:
    """The prompt for chat messages (as templates take them), with the tools where the template has them,
    else described in the system message."""
    if tools is None:
        return await client.encode_chat(messages, add_generation_prompt, None, kwargs)
    if client.tokenizer.template_supports_tools:
        return await client.encode_chat(messages, add_generation_prompt, tools.template_tools(), kwargs)
    return await client.encode_chat(generic_tool_messages(messages, tools), add_generation_prompt, None, kwargs)


async def reply_grammar(
    client: EngineClient, tools: ToolSetup | None, response_format: ResponseFormat | None
) -> Grammar | None:
    """What constrains the reply: a forced tool call, a call in Hermes form once begun, or the format."""
    if tools is None or tools.mode is ToolMode.NONE:
        return await response_grammar(client, response_format)
    constraint = tools.constraint()
    if constraint is None:  # "auto": free text, and each call constrained once it has begun
        if response_format is not None and response_format.type != "text":
            return await response_grammar(client, response_format)  # the format asked for wins
        tokenizer = client.tokenizer
        hermes = not tokenizer.template_supports_tools or "<tool_call>" in (tokenizer.chat_template or "")
        if not hermes:  # Llama 3 or Mistral formats: parsed, not constrained
            return None
        source = tools.call_grammar(special_trigger="<tool_call>" in tokenizer.control_tokens)
        return await client.lark_grammar(source, "tools")
    if response_format is not None and response_format.type != "text":
        raise APIError(
            400, "a forced tool call and a response_format cannot both constrain one reply", param="response_format"
        )
    return await client.json_schema_grammar(constraint, "tools")


@dataclass
class _ChoiceState:
    """One choice's reply so far, for the tool modes that read it before passing it on."""

    text: str = ""
    reasoning: str = ""
    content_sent: str = ""
    call_ids: list[str] = field(default_factory=list)
    header_sent: bool = False


class ChatRenderer(OpenAIRenderer):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(
        self, model: str, tokenizer: Tokenizer, include_usage: bool, tools: ToolSetup | None, reasoning: bool = False
    ) -> None:
        super().__init__(model, tokenizer, include_usage)
        self.reasoning = reasoning  # a thinking model's reasoning goes out as `reasoning_content`
        # "none" parses nothing: the reply is text, as without tools
        self.tools = tools if tools is not None and tools.mode is not ToolMode.NONE else None
        self._choices: dict[int, _ChoiceState] = {}

    def opening(self, job: Job) -> list[bytes]:
        return [self.chunk(i, {"delta": {"role": "assistant"}}) for i in range(len(job.streams))]

    def delta(self, job: Job, index: int, delta: Delta) -> list[bytes]:
        thought = [self.chunk(index, {"delta": {"reasoning_content": delta.reasoning}})] if self._shows(delta) else []
        if self.tools is None:
            return thought + self._text_delta(index, delta)
        state = self._choices.setdefault(index, _ChoiceState())
        state.text += delta.text
        state.reasoning += delta.reasoning
        return thought + self._tool_delta(index, state, delta)

    def _shows(self, delta: Delta) -> bool:
        return self.reasoning and bool(delta.reasoning)

    def _tool_delta(self, index: int, state: _ChoiceState, delta: Delta) -> list[bytes]:
        assert self.tools is not None
        # The tokens' logprobs as they come (the text they make may be held back, or become a call)
        out = [self.chunk(index, {"delta": {}, "logprobs": chat_logprobs(self.tokenizer, delta.logprobs)})]
        out = out if delta.logprobs else []
        if self.tools.mode is ToolMode.NAMED:
            out += self._named_delta(index, state, delta.text)
        elif self.tools.mode is ToolMode.AUTO:
            out += self._content_so_far(index, state, self.tools.streamable_content(state.text))
        # "required": a JSON array of calls, sent whole once it has ended
        if delta.finish_reason is not None:
            out += self._finish(index, state, delta.finish_reason)
        return out

    def _text_delta(self, index: int, delta: Delta) -> list[bytes]:
        out = []
        if delta.text or delta.logprobs:
            lp = chat_logprobs(self.tokenizer, delta.logprobs)
            out.append(self.chunk(index, {"delta": {"content": delta.text}, "logprobs": lp}))
        if delta.finish_reason is not None:
            out.append(self.chunk(index, {"delta": {}, "finish_reason": delta.finish_reason}))
        return out

    def _named_delta(self, index: int, state: _ChoiceState, text: str) -> list[bytes]:
        """A forced call streams as it is generated: the reply is the call's arguments."""
        out = []
        if not state.header_sent:
            assert self.tools is not None and self.tools.name is not None
            state.header_sent = True
            out.append(self._call_chunk(index, 0, self._call_id(state, 0), self.tools.name))
        if text:
            out.append(self.chunk(index, {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}}))
        return out

    def _content_so_far(self, index: int, state: _ChoiceState, content: str) -> list[bytes]:
        new = content[len(state.content_sent) :]
        state.content_sent = content
        return [self.chunk(index, {"delta": {"content": new}})] if new else []

    def _finish(self, index: int, state: _ChoiceState, reason: str) -> list[bytes]:
        assert self.tools is not None
        content, calls = self.tools.parse(state.text)
        calls = calls or _calls_in(self.tools, state.reasoning)
        out = self._content_so_far(index, state, content or "") if self.tools.mode is not ToolMode.NAMED else []
        if self.tools.mode is not ToolMode.NAMED:
            for k, call in enumerate(calls):
                out.append(self._call_chunk(index, k, self._call_id(state, k), call.name))
                arguments = {"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]}
                out.append(self.chunk(index, {"delta": arguments}))
        out.append(self.chunk(index, {"delta": {}, "finish_reason": _finish_reason(reason, calls)}))
        return out

    def _call_chunk(self, index: int, k: int, call_id: str, name: str) -> bytes:
        header = {"index": k, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        return self.chunk(index, {"delta": {"tool_calls": [header]}})

    @staticmethod
    def _call_id(state: _ChoiceState, k: int) -> str:
        while len(state.call_ids) <= k:
            state.call_ids.append(new_call_id())
        return state.call_ids[k]

    def choice(self, index: int, proc: OutputProcessor) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": proc.text}
        if self.reasoning:
            message["reasoning_content"] = proc.reasoning or None
        reason = proc.finish_reason
        if self.tools is not None:
            content, calls = self.tools.parse(proc.text)
            calls = calls or _calls_in(self.tools, proc.reasoning)
            state = self._choices.setdefault(index, _ChoiceState())
            message["content"] = content
            if calls:
                message["tool_calls"] = [_call_json(self._call_id(state, k), c) for k, c in enumerate(calls)]
            reason = _finish_reason(reason or "stop", calls)
        return {
            "index": index,
            "message": message,
            "logprobs": chat_logprobs(self.tokenizer, proc.logprobs),
            "finish_reason": reason,
        }


def _calls_in(tools: ToolSetup, reasoning: str) -> list[ParsedCall]:
    """Calls a thinking model wrote inside its reasoning (Qwen3 sometimes does): calls all the same, when
    the answer has none ("auto" only: a forced call is constrained into the answer)."""
    if tools.mode is not ToolMode.AUTO or not reasoning:
        return []
    return tools.parse(reasoning)[1]


def _finish_reason(reason: str, calls: list[ParsedCall]) -> str:
    return "tool_calls" if calls and reason == "stop" else reason


def _call_json(call_id: str, call: ParsedCall) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
