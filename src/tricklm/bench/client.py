"""The HTTP side of the benchmark: one streamed OpenAI request → one `RequestRecord`, the health probe,
model discovery and token counting. Whatever the server does, a request ends as a record, never as an
exception: a non-200 status, an in-band `{"error": ...}` event, a dropped connection, a timeout, an event
that is not JSON or a stream without `[DONE]` each mark the record failed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from tricklm.bench.metrics import HealthSample, RequestRecord

ENDPOINT_PATHS = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "messages": "/v1/messages",
    "responses": "/v1/responses",
    "embeddings": "/v1/embeddings",
    "rerank": "/v1/rerank",
}
# Endpoints answered whole, for a batch of texts a request (the request's texts are its prompt)
ENCODER_ENDPOINTS = ("embeddings", "rerank")
# What a reranking benchmark asks of its documents (the scores' values do not matter to the timing)
RERANK_QUERY = "Which of these passages explains how something works?"
# A listed model's `task` (tricklm's /v1/models) that each endpoint needs
ENDPOINT_TASKS = {"embeddings": "embed", "rerank": "rerank"}
_ERROR_BODY_CHARS = 300


class BenchError(Exception):
    """The benchmark cannot start (server unreachable, no model); reported without a traceback."""


def normalize_base_url(url: str) -> str:
    """`http://host:port`, accepting the `.../v1` form that OpenAI clients use."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(frozen=True)
class Target:
    """Where and what to send; every request of a run uses the same settings."""

    base_url: str
    model: str
    endpoint: str = "completions"
    output_len: int = 128
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout: float = 300.0
    response_format: dict[str, Any] | None = None  # sent as it is: structured outputs

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINT_PATHS[self.endpoint]


Messages = list[dict[str, str]]


Prompt = str | Messages | list[str]


def request_body(target: Target, prompt: Prompt) -> dict[str, Any]:
    """`prompt` is the text of one user message, a whole conversation (chat only), or the texts of one
    embeddings or rerank request."""
    if target.endpoint in ENCODER_ENDPOINTS:
        texts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
        if target.endpoint == "embeddings":
            return {"model": target.model, "input": texts}
        return {"model": target.model, "query": RERANK_QUERY, "documents": texts}
    assert not (isinstance(prompt, list) and prompt and isinstance(prompt[0], str))
    if target.endpoint in ("messages", "responses"):
        return _agent_api_body(target, prompt)  # type: ignore[arg-type]
    body: dict[str, Any] = {"model": target.model}
    if isinstance(prompt, list):
        body["messages"] = prompt  # a conversation
    elif target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body |= {"max_tokens": target.output_len, "temperature": target.temperature, "stream": True}
    body["stream_options"] = {"include_usage": True}
    if target.ignore_eos:
        body["ignore_eos"] = True
    if target.response_format is not None:
        body["response_format"] = target.response_format
    return body


def _agent_api_body(target: Target, prompt: str | Messages) -> dict[str, Any]:
    """Anthropic's Messages or OpenAI's Responses body for the same request (`ignore_eos` is an extension
    that tricklm and vLLM read)."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    body: dict[str, Any] = {"model": target.model, "temperature": target.temperature, "stream": True}
    if target.endpoint == "messages":
        body |= {"messages": messages, "max_tokens": target.output_len}
    else:
        body |= {"input": messages, "max_output_tokens": target.output_len, "store": False}
    if target.ignore_eos:
        body["ignore_eos"] = True
    return body


# ---- one streamed request ------------------------------------------------------------------------


async def send_request(client: httpx.AsyncClient, target: Target, prompt: Prompt, index: int) -> RequestRecord:
    """Send one streaming request and time it; failures of any kind end up in the record."""
    record = RequestRecord(index=index, start=time.perf_counter())
    try:
        async with asyncio.timeout(target.timeout):
            await _exchange(client, target, prompt, record)
    except (TimeoutError, httpx.TimeoutException):
        record.fail("timeout", f"no complete answer within {target.timeout:g} s")
    except httpx.HTTPError as e:
        record.fail("connection", f"{type(e).__name__}: {e}")
    except Exception as e:  # the tool must survive anything a server does
        record.fail("client", f"{type(e).__name__}: {e}")
    if record.end is None:
        record.end = time.perf_counter()
    return record


async def _exchange(client: httpx.AsyncClient, target: Target, prompt: Prompt, record: RequestRecord) -> None:
    body = request_body(target, prompt)
    if target.endpoint in ENCODER_ENDPOINTS:
        await _whole(client, target, body, record)
        return
    async with client.stream("POST", target.url, json=body, timeout=target.timeout) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode("utf-8", "replace")
            record.end = time.perf_counter()
            record.fail("http_status", f"HTTP {response.status_code}: {error_message(text)}")
            return
        await read_stream(sse_data(response.aiter_lines()), record)


async def _whole(client: httpx.AsyncClient, target: Target, body: dict[str, Any], record: RequestRecord) -> None:
    """An embeddings or rerank request: one JSON answer with an item per input."""
    response = await client.post(target.url, json=body, timeout=target.timeout)
    record.end = time.perf_counter()
    text = response.text
    if response.status_code != 200:
        record.fail("http_status", f"HTTP {response.status_code}: {error_message(text)}")
        return
    try:
        answer = json.loads(text)
        items = answer["data" if target.endpoint == "embeddings" else "results"]
        usage = answer.get("usage") or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        record.fail("bad_response", f"not an answer of {target.endpoint}: {text[:_ERROR_BODY_CHARS]!r}")
        return
    sent = len(body.get("input") or body.get("documents") or [])
    if not isinstance(items, list) or len(items) != sent:
        record.fail("bad_response", f"{sent} inputs sent, {len(items) if isinstance(items, list) else 0} answered")
        return
    record.inputs = sent
    record.prompt_tokens = _int_or_none(usage.get("prompt_tokens", usage.get("total_tokens")))
    record.finish_reason = "stop"


async def read_stream(events: AsyncIterator[str], record: RequestRecord) -> None:
    """Consume SSE data payloads into `record` until `[DONE]`, an error event or the end of the stream."""
    is_done = False
    async for data in events:
        record.end = time.perf_counter()
        if data == "[DONE]":
            is_done = True
            break
        apply_event(data, record, record.end)
        if not record.is_ok:
            return
    # Some servers (transformers serve) end a complete stream without [DONE]; a finish_reason shows it
    # was complete, as vLLM's benchmark also accepts.
    if not is_done and record.finish_reason is None:
        record.fail("incomplete", "the stream ended without data: [DONE] or a finish_reason")


def apply_event(data: str, record: RequestRecord, now: float) -> None:
    """Update `record` from one OpenAI stream event (completion or chat chunk, usage chunk, error)."""
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        record.fail("bad_event", f"not JSON: {data[:_ERROR_BODY_CHARS]!r}")
        return
    if not isinstance(event, dict):
        record.fail("bad_event", f"not a JSON object: {data[:_ERROR_BODY_CHARS]!r}")
    elif event.get("error") or event.get("type") == "error":
        record.fail("stream_error", error_message(data))
    elif str(event.get("type", "")).startswith("response."):
        _apply_response_event(event, record, now)
    elif "type" in event:
        _apply_message_event(event, record, now)
    else:
        _apply_chunk(event, record, now)


def _apply_message_event(event: dict[str, Any], record: RequestRecord, now: float) -> None:
    """One event of Anthropic's Messages stream."""
    kind, delta = event["type"], event.get("delta")
    if kind == "content_block_delta" and isinstance(delta, dict) and isinstance(delta.get("text"), str):
        record.chunk_times.append(now)
        record.text += delta["text"]
    elif kind == "message_delta":
        usage = event.get("usage") or {}
        record.usage_output_tokens = _int_or_none(usage.get("output_tokens"))
        cached = _int_or_none(usage.get("cache_read_input_tokens")) or 0
        uncached = _int_or_none(usage.get("input_tokens"))
        record.prompt_tokens = None if uncached is None else uncached + cached
        record.cached_tokens = cached
        if isinstance(delta, dict) and delta.get("stop_reason"):
            record.finish_reason = str(delta["stop_reason"])


def _apply_response_event(event: dict[str, Any], record: RequestRecord, now: float) -> None:
    """One event of OpenAI's Responses stream."""
    kind = event["type"]
    if kind == "response.output_text.delta" and isinstance(event.get("delta"), str):
        record.chunk_times.append(now)
        record.text += event["delta"]
    elif kind in ("response.completed", "response.incomplete"):
        response = event.get("response") or {}
        usage = response.get("usage") or {}
        record.usage_output_tokens = _int_or_none(usage.get("output_tokens"))
        record.prompt_tokens = _int_or_none(usage.get("input_tokens"))
        details = usage.get("input_tokens_details")
        if isinstance(details, dict):
            record.cached_tokens = _int_or_none(details.get("cached_tokens"))
        record.finish_reason = str(response.get("status", kind))
    elif kind == "response.failed":
        record.fail("stream_error", error_message(json.dumps(event.get("response", {}).get("error") or event)))


def _apply_chunk(event: dict[str, Any], record: RequestRecord, now: float) -> None:
    usage = event.get("usage")
    if isinstance(usage, dict):
        record.usage_output_tokens = _int_or_none(usage.get("completion_tokens"))
        record.prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            record.cached_tokens = _int_or_none(details.get("cached_tokens"))
    for choice in event.get("choices") or []:
        text = _choice_text(choice)
        if text:
            record.chunk_times.append(now)
            record.text += text
        if isinstance(choice, dict) and choice.get("finish_reason"):
            record.finish_reason = str(choice["finish_reason"])


def _choice_text(choice: Any) -> str:
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def error_message(text: str) -> str:
    """The `message` of an OpenAI (or FastAPI `detail`) error body, else the start of the body."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:_ERROR_BODY_CHARS] or "(empty body)"
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail") or error
    return str(error)[:_ERROR_BODY_CHARS]


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each SSE event (several `data:` lines joined by newlines); comments and other fields skipped."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            value = line[len("data:") :]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


# ---- health probe --------------------------------------------------------------------------------


class HealthProbe:
    """GET the health route every `interval` seconds (the next probe waits for the previous answer).

    A 404 means the server has no such route: probing stops and `is_supported` turns False.
    """

    def __init__(self, client: httpx.AsyncClient, url: str, interval: float = 0.1, timeout: float = 30.0) -> None:
        self.client, self.url, self.interval, self.timeout = client, url, interval, timeout
        self.samples: list[HealthSample] = []
        self.is_supported = True
        self._stopping = False

    async def run(self) -> None:
        """Probe until cancelled, stopped, or the route turns out not to exist."""
        while self.is_supported and not self._stopping:
            sample = HealthSample(sent=time.perf_counter())
            self.samples.append(sample)
            await self._probe(sample)
            await asyncio.sleep(max(0.0, sample.sent + self.interval - time.perf_counter()))

    async def _probe(self, sample: HealthSample) -> None:
        try:
            response = await self.client.get(self.url, timeout=self.timeout)
        except httpx.HTTPError as e:
            sample.latency = time.perf_counter() - sample.sent
            sample.error = f"{type(e).__name__}: {e}"
            return
        sample.latency, sample.status = time.perf_counter() - sample.sent, response.status_code
        if response.status_code == 404:
            self.samples.remove(sample)
            self.is_supported = False

    def stop(self) -> None:
        """Send no more probes; `run` returns once the one in flight has its answer."""
        self._stopping = True

    def finish(self) -> list[HealthSample]:
        """Mark a probe still waiting for its answer as failed and return all samples."""
        for sample in self.samples:
            if sample.status is None and sample.error is None:
                sample.error = "no answer before the run ended"
        return self.samples


# ---- discovery -----------------------------------------------------------------------------------


async def first_model_id(client: httpx.AsyncClient, base_url: str, endpoint: str = "completions") -> str:
    """The first model id listed by GET /v1/models that serves `endpoint` (when the list says what each
    model is for, as tricklm's does; else the first)."""
    url = f"{base_url}/v1/models"
    try:
        response = await client.get(url, timeout=30.0)
        response.raise_for_status()
        cards = response.json()["data"]
        task = ENDPOINT_TASKS.get(endpoint, "generate")
        fitting = [c for c in cards if c.get("task", task) == task]
        return str((fitting or cards)[0]["id"])
    except httpx.HTTPError as e:
        raise BenchError(f"cannot list models at {url} ({type(e).__name__}: {e}); is the server up?") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"{url} did not list any model; pass --model NAME") from None


async def count_tokens(client: httpx.AsyncClient, base_url: str, model: str, text: str) -> int | None:
    """Tokens in `text` by the server's POST /tokenize (vLLM, tricklm), or None if it has none."""
    body = {"model": model, "prompt": text, "add_special_tokens": False}
    try:
        response = await client.post(f"{base_url}/tokenize", json=body, timeout=30.0)
        result = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(result, dict):
        return None
    if isinstance(result.get("count"), int):
        return int(result["count"])
    tokens = result.get("tokens")
    return len(tokens) if isinstance(tokens, list) else None


_SPEC_COUNTERS = ("tricklm:spec_decode_num_draft_tokens_total", "tricklm:spec_decode_num_accepted_tokens_total")


async def speculation_counters(client: httpx.AsyncClient, base_url: str, model: str) -> tuple[float, float] | None:
    """The server's draft tokens verified and kept so far for `model` (tricklm's /metrics, whose series
    carry model_name), or None if it has none."""
    try:
        response = await client.get(base_url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in _SPEC_COUNTERS and ("model_name=" not in line or f'model_name="{model}"' in line):
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    if len(values) < len(_SPEC_COUNTERS):
        return None
    return values[_SPEC_COUNTERS[0]], values[_SPEC_COUNTERS[1]]
