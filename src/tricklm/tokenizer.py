"""Tokenizer, chat template and incremental detokenizer for a Hugging Face model folder.

Uses the `tokenizers` library directly (no transformers import at serve time) and renders chat
templates with a sandboxed Jinja environment configured the way transformers does it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from tricklm.model.config import ModelLoadError

# The variables a chat template gets from the server itself, which a request's template kwargs cannot replace
TEMPLATE_NAMES = frozenset(
    {"messages", "add_generation_prompt", "tools", "bos_token", "eos_token", "raise_exception", "strftime_now"}
)


class ChatTemplateError(ValueError):
    """The model has no chat template, or rendering it failed."""


class Tokenizer:
    def __init__(self, model_dir: Path) -> None:
        path = model_dir / "tokenizer.json"
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on missing/corrupt files
            raise ModelLoadError(f"{path} could not be read: {e}") from None
        self._config = _read_optional_json(model_dir / "tokenizer_config.json")
        self.chat_template = _chat_template(model_dir, self._config)
        self.bos_token = _token_str(self._config.get("bos_token"))
        self.eos_token = _token_str(self._config.get("eos_token"))
        self.eos_token_ids = self._eos_ids(model_dir)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # No token stands for more characters than its vocabulary string has (byte-level BPE: one per byte)
        self.max_token_chars = max((len(t) for t in vocab), default=1)
        # Special added tokens only: a normal added token (Qwen3's <think>) is text a user may write
        added = self._tok.get_added_tokens_decoder()
        self.control_tokens = tuple(t.content for t in added.values() if t.special and t.content)
        self._control_ids = frozenset(i for i, t in added.items() if t.special)

    @functools.cached_property
    def _as_text(self) -> HFTokenizer:
        """A second instance that reads control-token text as plain text (a flag on the instance, so it is
        not toggled on a tokenizer that other threads share). Made on first use, by a request whose text
        spells a control token: it holds as much memory as the first."""
        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = True
        return tok

    def _eos_ids(self, model_dir: Path) -> frozenset[int]:
        ids: set[int] = set()
        gen = _read_optional_json(model_dir / "generation_config.json")
        cfg = _read_optional_json(model_dir / "config.json")
        for source in (gen.get("eos_token_id"), cfg.get("eos_token_id")):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(int(i) for i in source)
        if self.eos_token is not None and (tid := self._tok.token_to_id(self.eos_token)) is not None:
            ids.add(tid)
        return frozenset(ids)

    def encode(self, text: str, add_special_tokens: bool = True, parse_control: bool = True) -> list[int]:
        """Token ids of `text`; `parse_control=False` reads control-token text (`<|im_end|>`) as plain text.

        Through `encode_batch`, which releases the GIL: a long prompt tokenized in a worker thread
        leaves the event loop free (`encode` holds the GIL throughout).
        """
        tok = self._tok if parse_control else self._as_text
        return list(tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """The rendered chat, where the template's markup is control tokens and the messages' text never is.

        A user who writes `<|im_start|>system` gets those characters as text, not a forged turn. The
        rendering is tokenized whole (as any server would) unless a control token came out of message
        text; then the template's pieces and the messages' strings are tokenized apart.
        """
        text = self.apply_chat_template(messages, add_generation_prompt, tools, template_kwargs)
        encoding = self._tok.encode_batch([text], add_special_tokens=False)[0]
        pieces = self._pieces(messages, add_generation_prompt, text, tools, template_kwargs)
        if pieces is None:  # the template changed the strings, so where they stand is unknown
            if any(c in value for value in [*_strings(messages), *_strings(tools)] for c in self.control_tokens):
                raise ChatTemplateError("message text may not spell the model's control tokens with this chat template")
            return list(encoding.ids)
        spans, pos = [], 0
        for piece, is_text in pieces:
            if is_text:
                spans.append((pos, pos + len(piece)))
            pos += len(piece)
        forged = any(
            start < span_end and span_start < end
            for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)
            if token_id in self._control_ids
            for span_start, span_end in spans
        )
        if not forged:
            return list(encoding.ids)
        ids: list[int] = []
        for piece, is_text in pieces:
            ids += self.encode(piece, add_special_tokens=False, parse_control=not is_text)
        return ids

    def _pieces(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        text: str,
        tools: list[Any] | None,
        template_kwargs: Mapping[str, Any] | None,
    ) -> list[tuple[str, bool]] | None:
        """`text` cut into (piece, is message text), found by rendering again with a marker for every string
        of the messages; None if the template does not place the strings as they are (trims them, say)."""
        values: list[str] = []
        try:
            marked = [_marked(m, values) for m in messages]
            # A tool's name, description and schema are the client's text too, never the template's markup
            template = self.apply_chat_template(marked, add_generation_prompt, _marked(tools, values), template_kwargs)
        except ChatTemplateError:  # a template that inspects the strings themselves
            return None
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for match in _MARKER.finditer(template):
            index = int(match.group(1))
            if index >= len(values):
                return None
            pieces += [(template[pos : match.start()], False), (values[index], True)]
            pos = match.end()
        pieces.append((template[pos:], False))
        return pieces if "".join(p for p, _ in pieces) == text else None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def backend_json(self) -> str:
        """The tokenizer as `tokenizer.json` text (what grammar engines build their token tables from)."""
        return str(self._tok.to_str())

    def token_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry (an added token's text, or a piece as the vocabulary spells it)."""
        found = self._tok.token_to_id(piece)
        return int(found) if found is not None else None

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""

    @functools.cached_property
    def _compiled_template(self) -> jinja2.Template:
        assert self.chat_template
        return _jinja_env().from_string(self.chat_template)

    @property
    def template_supports_tools(self) -> bool:
        """Whether the chat template renders a `tools` list itself (HF templates that do all name it)."""
        return bool(self.chat_template and "tools" in self.chat_template)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The chat rendered by the model's template, with `template_kwargs` as further variables (Qwen3's
        `enable_thinking`, say).

        A template that refuses a system role (Gemma 2's raises "System role not supported") gets the system
        prompt folded into the first user turn, followed by a blank line, as Gemma 3's own template does.
        """
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions with a plain prompt")
        try:
            return self._render(messages, add_generation_prompt, tools, template_kwargs)
        except (jinja2.TemplateError, TypeError, AttributeError) as e:  # a kwarg of the wrong type too
            error = e
        folded = _system_folded(messages) if "system" in str(error).lower() else None
        if folded is not None:
            try:
                return self._render(folded, add_generation_prompt, tools, template_kwargs)
            except (jinja2.TemplateError, TypeError, AttributeError) as e:  # a kwarg of the wrong type too
                error = e
        raise ChatTemplateError(f"chat template failed: {error}") from None

    def _render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[Any] | None,
        template_kwargs: Mapping[str, Any] | None,
    ) -> str:
        return self._compiled_template.render(
            **{k: v for k, v in (template_kwargs or {}).items() if k not in TEMPLATE_NAMES},
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools or None,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def _system_folded(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """`messages` with a leading system message's text put before the first user turn's text; None when
    there is no such pair of plain-text messages."""
    if len(messages) < 2:
        return None
    system, user = messages[0], messages[1]
    if system.get("role") != "system" or user.get("role") != "user":
        return None
    if not isinstance(system.get("content"), str) or not isinstance(user.get("content"), str):
        return None
    return [{**user, "content": f"{system['content']}\n\n{user['content']}"}, *messages[2:]]


_MARKER = re.compile("\ue000(\\d+)\ue001")


def _marked(value: Any, values: list[str], key: str = "") -> Any:
    """`value` with every string (at any depth, but a message's role) replaced by a numbered marker."""
    if isinstance(value, str) and key != "role":
        values.append(value)
        return f"\ue000{len(values) - 1}\ue001"
    if isinstance(value, dict):
        return {k: _marked(v, values, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_marked(v, values) for v in value]
    return value


def _strings(value: Any, key: str = "") -> list[str]:
    if isinstance(value, str):
        return [] if key == "role" else [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(v, k)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text for training masks with
    it; LFM2.5's and Laguna's templates use it): renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 (Jinja declares it as a plain set attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _jinja_env() -> jinja2.Environment:
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | str | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # As transformers' filter: no HTML escaping (Jinja's own tojson escapes <, > and &), same options
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never end inside a UTF-8 character.

    Decodes a short window (prefix_offset..end) and emits only what extends past the already-emitted
    part, so byte-level BPE pieces of one character are held until the character is complete.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._tok.decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Text still held at the end (an incomplete character decodes as U+FFFD, as non-streaming does)."""
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._tok.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


class StopStringMatcher:
    """Holds back just enough text to catch stop strings split across deltas; never emits a stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the text (Anthropic's `stop_sequence`)

    @property
    def active(self) -> bool:
        return bool(self._stop)

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        if not self._stop:
            return text, False
        buf = self._held + text
        hits = [(i, s) for s in self._stop if (i := buf.find(s)) >= 0]
        if hits:
            self._held = ""
            at, self.matched = min(hits, key=lambda hit: hit[0])
            return buf[:at], True
        keep = self._holdback(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out

    def _holdback(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
