"""The design doc's serving architecture ("Async Streaming with FastAPI"), kept as the comparison baseline.

What it is, exactly as the doc builds it:
- FastAPI + uvicorn, one process, one Hugging Face `AutoModelForCausalLM` in fp32;
- a synchronous `generate_stream` generator per request: prefill the whole prompt, then one decode step per
  token, carrying HF's `past_key_values` from step to step;
- every `next(generator)` runs in the event loop's default thread pool via `loop.run_in_executor`, so each
  token hands control back to the event loop; requests are never batched together: concurrent requests
  compete for the cores, each doing its own batch-1 forward passes.

One unavoidable deviation: the doc's loop calls `run_in_executor(None, next, gen)` and catches
`StopIteration`, but asyncio cannot set StopIteration on a Future (CPython raises "TypeError: StopIteration
interacts badly with generators and cannot be raised into a Future" inside the loop and the awaiting stream
hangs forever). So the end of a stream is signalled with `next`'s default argument:
`run_in_executor(None, next, gen, _END)`: the same pattern, one token per executor call.

Routes: POST /generate (the doc's protocol, streamed or not), GET /health, and the OpenAI-compatible
POST /v1/completions (streamed `text_completion` chunks, a final usage chunk with
`stream_options.include_usage`, `data: [DONE]`) and GET /v1/models, so `tricklm bench` can drive it.

Run:  python benchmarks/baseline_threadpool.py --model ~/.cache/tricklm/SmolLM2-135M-Instruct --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = Path.home() / ".cache" / "tricklm" / "SmolLM2-135M-Instruct"
_END: dict[str, Any] = {}  # `next(gen, _END)` returns this when the generator is exhausted
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---- the engine: a synchronous generator per request --------------------------------------------


class Engine:
    """One HF causal LM in fp32; `generate_stream` yields one token per `next()`."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.eval()
        eos = self.tokenizer.eos_token_id
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids: set[int] = {int(i) for i in [eos, *ids] if i is not None}

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt))

    def generate_stream(
        self, prompt: str, max_tokens: int, temperature: float, ignore_eos: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Prefill, then one decode step per token; yields `{"token", "token_id", ...}` per token.

        Each step runs under its own `torch.inference_mode()`: successive `next()` calls may run on different
        executor threads, and grad mode is thread-local.
        """
        prompt_ids = self.encode(prompt)
        generated: list[int] = []
        emitted = ""  # text already yielded; holds back an incomplete UTF-8 sequence
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
            past = out.past_key_values
            next_token = _sample(out.logits[0, -1], temperature)
        for step in range(max_tokens):
            generated.append(next_token)
            is_eos = next_token in self.eos_ids and not ignore_eos
            text = "" if is_eos else self._delta(generated, emitted)
            emitted += text
            now = time.perf_counter()
            timing = {"prefill_time_ms": (now - t0) * 1000} if step == 0 else {"step_ms": (now - t0) * 1000}
            finish = "stop" if is_eos else ("length" if step == max_tokens - 1 else None)
            yield {
                "token": text,
                "token_id": next_token,
                "prompt_tokens": len(prompt_ids),
                "finish_reason": finish,
                **timing,
            }
            if finish is not None:
                return
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([[next_token]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                next_token = _sample(out.logits[0, -1], temperature)

    def _delta(self, generated: list[int], emitted: str) -> str:
        text = str(self.tokenizer.decode(generated, skip_special_tokens=True))
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        return text[len(emitted) :] if text.startswith(emitted) else ""

    def generate(self, prompt: str, max_tokens: int, temperature: float, ignore_eos: bool = False) -> dict[str, Any]:
        """The non-streaming call: run the whole generator and summarise it."""
        start = time.perf_counter()
        first: float | None = None
        text, ids, finish, prompt_tokens = "", [], None, 0
        for chunk in self.generate_stream(prompt, max_tokens, temperature, ignore_eos):
            first = first if first is not None else time.perf_counter()
            text += chunk["token"]
            ids.append(chunk["token_id"])
            finish, prompt_tokens = chunk["finish_reason"], chunk["prompt_tokens"]
        total = time.perf_counter() - start
        return {
            "text": text,
            "token_ids": ids,
            "finish_reason": finish,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(ids),
            "time_to_first_token_ms": ((first or start) - start) * 1000,
            "total_time_ms": total * 1000,
            "tokens_per_second": len(ids) / total if total > 0 else 0.0,
        }


def _sample(logits: torch.Tensor, temperature: float) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1).item())


# ---- request bodies ------------------------------------------------------------------------------


class GenerateRequest(BaseModel):
    """The design doc's request; `stream` picks SSE or one JSON answer."""

    prompt: str = Field(min_length=1)
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    stream: bool = False


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The part of OpenAI's `/v1/completions` that benchmarks use; other fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False


# ---- the app -------------------------------------------------------------------------------------


def create_app(engine: Engine, model_name: str) -> FastAPI:
    app = FastAPI(title="design-doc thread-pool baseline")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error(400, message)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "baseline"}
        return {"object": "list", "data": [card]}

    @app.post("/generate", response_model=None)
    async def generate(req: GenerateRequest) -> Response | dict[str, Any]:
        if req.stream:
            gen = engine.generate_stream(req.prompt, req.max_tokens, req.temperature)
            return StreamingResponse(_doc_sse(gen), media_type="text/event-stream", headers=_SSE_HEADERS)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, engine.generate, req.prompt, req.max_tokens, req.temperature)

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> Response:
        prompt = req.prompt if isinstance(req.prompt, str) else "".join(req.prompt[:1])
        if not prompt:
            return _error(400, "prompt must be a non-empty string")
        if req.stream_options is not None and not req.stream:
            return _error(400, "stream_options is only allowed when stream is true", param="stream_options")
        if req.model is not None and req.model != model_name:
            return _error(404, f"model {req.model!r} does not exist; this server has {model_name!r}", "model")
        gen = engine.generate_stream(prompt, req.max_tokens, req.temperature, req.ignore_eos)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            body = _openai_sse(gen, cid, created, model_name, usage)
            return StreamingResponse(body, media_type="text/event-stream", headers=_SSE_HEADERS)
        return JSONResponse(await _openai_whole(gen, cid, created, model_name))

    return app


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def _event(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _doc_sse(gen: Iterator[dict[str, Any]]) -> AsyncIterator[str]:
    """The doc's `stream_tokens`: one `run_in_executor(None, next, gen)` per token."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            chunk = await loop.run_in_executor(None, next, gen, _END)
            if chunk is _END:
                yield "data: [DONE]\n\n"
                break
            yield _event({"token": chunk["token"], "token_id": chunk["token_id"]})
    except Exception as e:  # a failure after the 200: in-band error, then [DONE]
        yield _event({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}})
        yield "data: [DONE]\n\n"


async def _openai_sse(
    gen: Iterator[dict[str, Any]], cid: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """The same per-token executor loop, framed as OpenAI `text_completion` chunks."""
    loop = asyncio.get_running_loop()
    prompt_tokens = completion_tokens = 0
    usage_field: dict[str, None] = {"usage": None} if include_usage else {}
    try:
        while True:
            chunk = await loop.run_in_executor(None, next, gen, _END)
            if chunk is _END:
                break
            prompt_tokens, completion_tokens = chunk["prompt_tokens"], completion_tokens + 1
            choice = {"index": 0, "text": chunk["token"], "logprobs": None, "finish_reason": chunk["finish_reason"]}
            base = {"id": cid, "object": "text_completion", "created": created, "model": model}
            yield _event({**base, "choices": [choice], **usage_field})
    except Exception as e:
        yield _event({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}})
        yield "data: [DONE]\n\n"
        return
    if include_usage:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        base = {"id": cid, "object": "text_completion", "created": created, "model": model}
        yield _event({**base, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


async def _openai_whole(gen: Iterator[dict[str, Any]], cid: str, created: int, model: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    text, count, prompt_tokens = "", 0, 0
    finish: Literal["stop", "length"] | None = None
    while (chunk := await loop.run_in_executor(None, next, gen, _END)) is not _END:
        text += chunk["token"]
        count, prompt_tokens, finish = count + 1, chunk["prompt_tokens"], chunk["finish_reason"]
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": count, "total_tokens": prompt_tokens + count},
    }


# ---- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="The design doc's thread-pool streaming server (comparison baseline).")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="local Hugging Face model folder")
    p.add_argument("--served-model-name", default=None, help="id in /v1/models (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)
    model_dir = args.model.expanduser()
    if not (model_dir / "config.json").is_file():
        p.error(
            f"{model_dir} is not a Hugging Face model folder; create the default one with "
            '`python -c "from tricklm.model.resolve import resolve_model; print(resolve_model(None))"`'
        )
    engine = Engine(model_dir)
    app = create_app(engine, args.served_model_name or model_dir.name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
