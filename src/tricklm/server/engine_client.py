"""What routes may use of the engine: its tokenizer and limits, prompt encoding, grammars, streams.

Routes go through this facade and never reach into the engine's parts, so that the engine can change
inside without the routes noticing, and so that what every request needs done (metrics when it ends,
its line in the access log) is done here, once, instead of in each route.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.concurrency import run_in_threadpool

from tricklm import __version__
from tricklm.engine.async_llm import AsyncEngine, RequestStream
from tricklm.engine.engine import Engine
from tricklm.engine.loop import EngineStats
from tricklm.engine.reasoning import ThinkTags
from tricklm.engine.sampling_params import SamplingParams
from tricklm.engine.structured import Grammar, GrammarError, GrammarUnavailable
from tricklm.server.errors import APIError
from tricklm.server.middleware.access_log import record_stream
from tricklm.server.observability.metrics import Metrics
from tricklm.server.prompts import check_length
from tricklm.tokenizer import ChatTemplateError, Tokenizer

logger = logging.getLogger(__name__)

# A schema that takes longer than this to compile is refused, never left to hang its request (vllm#54003)
GRAMMAR_TIMEOUT_S = 10.0
_MAX_REMEMBERED = 1024  # grammars remembered as too slow to compile


def _compile_timeout(param: str) -> APIError:
    message = f"'{param}' did not compile within {GRAMMAR_TIMEOUT_S:g} s; simplify it"
    return APIError(400, message, param=param, code="grammar_timeout")


class EngineClient:
    def __init__(
        self, engine: Engine, metrics: Metrics, request_timeout: float | None = None, served_name: str | None = None
    ) -> None:
        self._engine = engine
        self._async = AsyncEngine(engine, request_timeout)
        # The name requests and replies use (--served-model-name, else the model's own)
        self.served_name = served_name or engine.info.model_name
        self._metrics = metrics.for_engine(self.served_name, self.stats)
        # Its own threads: a slow compile must not hold a thread that tokenizing prompts waits for
        self._compiler = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tricklm-grammar")
        self._timed_out: set[str] = set()

    @property
    def tokenizer(self) -> Tokenizer:
        return self._engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self._engine.tokenizer.vocab_size

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def max_queue(self) -> int:
        return self._engine.config.max_queue

    @property
    def generation_defaults(self) -> dict[str, Any]:
        return self._engine.generation_defaults

    @functools.cached_property
    def think_tags(self) -> ThinkTags | None:
        """The model's thinking tags, if its template and vocabulary have them."""
        return ThinkTags.of(self.tokenizer)

    @functools.cached_property
    def system_fingerprint(self) -> str:
        """OpenAI's `system_fingerprint`: stable for one build serving one model file the same way, so that
        clients that log it can tell servers apart."""
        engine = self._engine
        source = engine.info.model_dir  # a GGUF's folder links the file itself
        files = sorted(p.resolve() for p in source.iterdir() if p.is_file())
        sizes = [(p.name, p.stat().st_size) for p in files]
        text = f"{__version__}|{engine.info.model_name}|{engine.config.quantization}|{sizes}"
        return "fp_" + hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def model_name(self) -> str:
        return self._engine.info.model_name

    def stats(self) -> EngineStats:
        return self._engine.loop.stats()

    def problem(self) -> tuple[str, str] | None:
        """Why the engine cannot take requests now, as a /health status and detail; None when it can."""
        loop = self._engine.loop
        if not loop.is_alive:
            return "error", f"engine stopped: {loop.error!r}"
        if loop.restarting:
            return "restarting", "the engine is restarting after a failed step"
        return None

    def end_all(self, message: str) -> None:
        """Ends every request in flight or waiting with `message` as its error (a bounded shutdown's last act)."""
        self._engine.loop.end_all(message)

    async def encode_text(self, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        check_length(self.max_model_len, self.tokenizer.max_token_chars, len(text), param)
        return await run_in_threadpool(self.tokenizer.encode, text, add_special_tokens)

    async def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The chat rendered by the model's template: its markup as control tokens, the messages' text as text."""
        text_chars = sum(len(v) for m in messages for v in m.values() if isinstance(v, str))
        extra = len(str(tools or "")) + len(str(template_kwargs or ""))
        check_length(self.max_model_len, self.tokenizer.max_token_chars, text_chars + extra, "messages")
        encode = self.tokenizer.encode_chat
        try:
            return await run_in_threadpool(encode, messages, add_generation_prompt, tools, template_kwargs)
        except (ChatTemplateError, ValueError) as e:
            raise APIError(400, str(e), param="messages", code="chat_template_error") from None

    async def compile(self, build: Callable[[], Grammar], param: str, key: str) -> Grammar:
        """Run a grammar compile off the event loop and the engine thread, within GRAMMAR_TIMEOUT_S.

        A compile that timed out keeps its worker thread until it ends (threads cannot be stopped), so
        the same grammar (`key`) is refused at once afterwards instead of tying up the workers again."""
        if key in self._timed_out:
            raise _compile_timeout(param)
        loop = asyncio.get_running_loop()
        try:
            # The token table first, on first use, outside the limit: its build is bounded by the vocabulary
            await loop.run_in_executor(self._compiler, self._engine.grammars.tokenizer)
            return await asyncio.wait_for(loop.run_in_executor(self._compiler, build), GRAMMAR_TIMEOUT_S)
        except TimeoutError:
            logger.warning(
                "a %s did not compile within %g s; refused, and so will it be again", param, GRAMMAR_TIMEOUT_S
            )
            if len(self._timed_out) < _MAX_REMEMBERED:
                self._timed_out.add(key)
            raise _compile_timeout(param) from None
        except GrammarUnavailable as e:
            raise APIError(501, str(e), "server_error", param=param, code="structured_outputs_unavailable") from None
        except GrammarError as e:
            raise APIError(400, str(e), param=param, code="unsupported_schema") from None

    async def json_schema_grammar(self, schema: dict[str, Any] | bool, param: str) -> Grammar:
        key = json.dumps(schema, sort_keys=True)
        return await self.compile(lambda: self._engine.grammars.json_schema(schema), param, key)

    async def lark_grammar(self, source: str, param: str) -> Grammar:
        return await self.compile(lambda: self._engine.grammars.lark(source, param), param, source)

    def stream(self, prompt_token_ids: list[int], params: SamplingParams, prefix: str) -> RequestStream:
        """Submit one generation; raises the engine's refusals (see state.engine_errors)."""
        stream = self._async.stream(prompt_token_ids, params, prefix, on_end=self._metrics.observe_finished)
        record_stream(stream)
        return stream

    def shutdown(self) -> None:
        self._compiler.shutdown(wait=False, cancel_futures=True)
