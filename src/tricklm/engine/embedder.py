"""Encoder models' engines: texts in, one vector each out (`Embedder`), or a query and documents in, a
relevance score each out (`Reranker`).

An encoder computes a whole input at once and keeps nothing between requests, so there is no scheduler
or cache here: a request's inputs are tokenized, sorted by length and run in padded batches of similar
lengths (little padding), one batch at a time under a lock, in the caller's thread (the server's worker
threads, never the event loop).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Encoding
from tokenizers import Tokenizer as HFTokenizer

from tricklm.model.bert import EncoderConfig, load_encoder
from tricklm.model.config import ModelLoadError

# Padded tokens a forward pass may hold (batch x longest input): batches of 8x this ran at half the speed
# (benchmarks/README.md, "Embeddings")
MAX_BATCH_TOKENS = 2048


class InputTooLong(ValueError):
    """An input is longer than the model reads; the message says by how much."""


class EncoderEngine:
    """What the embedding and reranking engines share: the folder's encoder and tokenizer, the batching."""

    task = ""

    def __init__(self, folder: Path, name: str | None = None) -> None:
        self.config = EncoderConfig.from_folder(folder)
        self.model = load_encoder(folder)
        path = folder / "tokenizer.json"
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on missing/corrupt files
            raise ModelLoadError(f"{path} could not be read: {e}") from None
        # sentence-transformers cuts inputs itself, at max_seq_length: the file's own settings do not apply
        self._tok.no_padding()
        self._tok.no_truncation()
        self.model_name = name or folder.name
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._lock = threading.Lock()
        self.memory_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def max_tokens(self) -> int:
        return self.config.max_seq_length

    def shutdown(self) -> None:
        """Nothing runs between requests (a forward pass is its caller's)."""

    def _batched(
        self, inputs: list[list[int]], types: list[list[int]] | None, run: Callable[..., torch.Tensor], width: int
    ) -> torch.Tensor:
        """run(ids, mask[, types]) over padded batches of similar lengths; [len(inputs), width], input order."""
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        out = torch.empty(len(inputs), width)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(inputs[order[end]]) <= MAX_BATCH_TOKENS:
                end += 1
            rows = order[start:end]
            longest = max(len(inputs[i]) for i in rows)
            pad = self.config.pad_token_id
            ids = torch.tensor([inputs[i] + [pad] * (longest - len(inputs[i])) for i in rows])
            mask = torch.tensor([[1] * len(inputs[i]) + [0] * (longest - len(inputs[i])) for i in rows])
            args = [ids, mask]
            if types is not None:
                args.append(torch.tensor([types[i] + [0] * (longest - len(types[i])) for i in rows]))
            with self._lock:
                out[rows] = run(*args)
            start = end
        return out


class Embedder(EncoderEngine):
    task = "embed"

    @property
    def dimensions(self) -> int:
        return self.config.hidden_size

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with the model's special tokens ([CLS] ... [SEP]); releases the GIL."""
        return [list(e.ids) for e in self._tok.encode_batch(texts)]

    def fit(self, ids: list[int], truncate: bool) -> list[int]:
        """`ids` within the model's length: cut (keeping the last, closing token, as the tokenizer's own
        truncation does) when `truncate`, else refused."""
        limit = self.max_tokens
        if len(ids) <= limit:
            return ids
        if not truncate:
            raise InputTooLong(f"an input has {len(ids)} tokens, more than this model reads ({limit})")
        return ids[: limit - 1] + ids[-1:]

    def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """[len(inputs), dimensions] float32, in input order."""
        return self._batched(inputs, None, self.model, self.dimensions)


class Reranker(EncoderEngine):
    """A cross-encoder: each (query, document) pair read as one input, as the tokenizer's pair template
    writes it ([CLS] query [SEP] document [SEP], the document as segment 1), scored by the model's head."""

    task = "rerank"

    def __init__(self, folder: Path, name: str | None = None) -> None:
        super().__init__(folder, name)
        # A second tokenizer that cuts the document of a pair that is too long (truncation is a tokenizer's
        # state, and the first one must not cut)
        self._cutter = HFTokenizer.from_str(self._tok.to_str())
        self._cutter.enable_truncation(self.max_tokens, strategy="only_second")

    def pairs(self, query: str, documents: list[str], truncate: bool) -> list[Encoding]:
        """Each pair's encoding within the model's length: a long document is cut from its end (the query
        is kept whole) when `truncate`, else refused; a query that leaves no room is refused either way."""
        limit = self.max_tokens
        query_len = len(self._tok.encode(query).ids)
        encodings: list[Encoding] = self._tok.encode_batch([(query, d) for d in documents])
        for i, enc in enumerate(encodings):
            if len(enc.ids) <= limit:
                continue
            if not truncate or query_len >= limit - 1:
                what = "the query" if query_len >= limit - 1 else f"document {i} with the query"
                raise InputTooLong(f"{what} has {len(enc.ids)} tokens, more than this model reads ({limit})")
            encodings[i] = self._cutter.encode(query, documents[i])
        return encodings

    def score(self, encodings: list[Encoding]) -> list[float]:
        """Each pair's relevance (the first label's score, after the model's activation), in input order."""
        ids = [list(e.ids) for e in encodings]
        # RoBERTa-shaped models have one segment: their tokenizers write 0s, a BERT tokenizer would write 1s
        types = [list(e.type_ids) if self.config.type_vocab_size > 1 else [0] * len(e.ids) for e in encodings]
        scores = self._batched(ids, types, self.model.score, self.config.num_labels)
        return [float(s) for s in scores[:, 0]]
