"""An embedding model's engine: texts (or token ids) in, one vector each out.

An encoder computes a whole input at once and keeps nothing between requests, so there is no scheduler
or cache here: a request's inputs are tokenized, sorted by length and run in padded batches of similar
lengths (little padding), one batch at a time under a lock, in the caller's thread (the server's worker
threads, never the event loop).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer

from tricklm.model.bert import EncoderConfig, load_encoder
from tricklm.model.config import ModelLoadError

# Padded tokens a forward pass may hold (batch x longest input): batches of 8x this ran at half the speed
# (benchmarks/README.md, "Embeddings")
MAX_BATCH_TOKENS = 2048


class InputTooLong(ValueError):
    """An input is longer than the model reads; the message says by how much."""


class Embedder:
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

    @property
    def dimensions(self) -> int:
        return self.config.hidden_size

    @property
    def max_tokens(self) -> int:
        return self.config.max_seq_length

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
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        out = torch.empty(len(inputs), self.dimensions)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(inputs[order[end]]) <= MAX_BATCH_TOKENS:
                end += 1
            batch = [inputs[i] for i in order[start:end]]
            width = max(len(ids) for ids in batch)
            ids = torch.tensor([x + [self.config.pad_token_id] * (width - len(x)) for x in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch])
            with self._lock:
                vectors = self.model(ids, mask)
            out[order[start:end]] = vectors
            start = end
        return out
