"""Lays a scheduled batch out as one flat token sequence, runs the model once, samples."""

from __future__ import annotations

import os

import torch

from tricklm.engine.cpu_contention import CpuContention
from tricklm.engine.kv_cache import KVCache
from tricklm.engine.request import Request, Sampled
from tricklm.engine.sampler import sample
from tricklm.engine.scheduler import ScheduledBatch
from tricklm.engine.speculative import verify
from tricklm.model.attention import AttentionMetadata, PrefillSegment, chunk_mask, decode_mask
from tricklm.model.base import CausalLM
from tricklm.model.native.decoder import NativeDecoder
from tricklm.model.weights.quant import MAX_PACKED_ROWS, model_dtypes

NATIVE_MAX_MEAN_CONTEXT = 256  # see `ModelRunner._native_attention_fits`


class ThreadPolicy:
    """How many torch threads a step gets: `max_threads` for large steps, `decode_threads` for small ones.

    Both default to every core, which measured fastest on an otherwise idle 2-core machine
    (`benchmarks/README.md`). On a machine whose cores are busy with other work,
    one thread avoids stalls: a parallel op waits for its slowest thread, and a thread whose core was
    taken waits a whole scheduler time slice. So unless the counts were chosen, a step runs on no more
    threads than other processes leave cores free (`CpuContention`).
    """

    MIN_PARALLEL_TOKENS = 64

    def __init__(
        self, max_threads: int | None, decode_threads: int | None = None, contention: CpuContention | None = None
    ) -> None:
        self.max_threads = max_threads or os.cpu_count() or 1
        self.decode_threads = min(decode_threads or self.max_threads, self.max_threads)
        self.contention = contention
        if contention is None and max_threads is None and decode_threads is None and self.max_threads > 1:
            self.contention = CpuContention(self.max_threads)

    def apply(self, num_tokens: int) -> None:
        wanted = self.max_threads if num_tokens >= self.MIN_PARALLEL_TOKENS else self.decode_threads
        if self.contention is not None:
            wanted = min(wanted, self.contention.threads())
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)


class ModelRunner:
    def __init__(
        self, model: CausalLM, kv_cache: KVCache, threads: ThreadPolicy | None = None, native: bool = True
    ) -> None:
        self.model = model
        self.kv = kv_cache
        self.threads = threads or ThreadPolicy(None)
        # Decode-only steps of up to MAX_PACKED_ROWS sequences (where the 4-bit weights are read) run in C++
        self.native = None
        if native:
            self.native = NativeDecoder.build(model, kv_cache.layers, kv_cache.block_size)
        self.windows = model.config.windows  # masks are built once per step for each distinct window
        self.num_kv_heads = model.config.num_kv_heads
        self.dtype = model_dtypes(model)[0]  # the activations'; masks match it

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> dict[str, Sampled]:
        order = self._decodes_first(batch)
        hidden = self._hidden(order, native=self._runs_native(order))
        picks = self._sampling_rows(order)
        if not picks:
            return {}
        logits = self.model.compute_logits(hidden[[row for _, rows in picks for row in rows]])
        out: dict[str, Sampled] = {}
        plain: list[int] = []  # logits rows of the requests without a draft, sampled together
        offset = 0
        for req, rows in picks:
            if req.draft:
                out[req.request_id] = verify(logits[offset : offset + len(rows)], req, req.draft)
            else:
                plain.append(offset)
            offset += len(rows)
        if plain:
            reqs = [picks[i][0] for i in range(len(picks)) if not picks[i][0].draft]
            out |= {req.request_id: res for req, res in zip(reqs, sample(logits[plain], reqs), strict=True)}
        return out

    def forward_logits(self, batch: ScheduledBatch, native: bool = False) -> torch.Tensor:
        """Logits of every token of the step, in batch order (for tests against a reference model).

        `native`: through the native decoder (a decode-only step of a model it runs), else in Python.
        """
        with torch.inference_mode():
            order = self._decodes_first(batch)
            if native and not self._runs_native(order):
                raise ValueError("the native decoder does not run this step")
            logits = self.model.compute_logits(self._hidden(order, native))
        starts, offset = {}, 0
        for req, n in order:
            starts[req.request_id] = offset
            offset += n
        rows = [
            starts[r.request_id] + i for r, n in zip(batch.requests, batch.num_tokens, strict=True) for i in range(n)
        ]
        return logits[rows]

    def _hidden(self, order: list[tuple[Request, int]], native: bool) -> torch.Tensor:
        """Final hidden states of every token of the step, in `order`."""
        input_ids, positions, slots = self._flatten(order)
        self.threads.apply(len(input_ids))
        if native:
            return self._native_forward(order, input_ids, positions, slots)
        return self.model(input_ids, positions, self.kv.layers, self._metadata(order, slots))

    def _runs_native(self, order: list[tuple[Request, int]]) -> bool:
        if self.native is None:
            return False
        if len(order) <= MAX_PACKED_ROWS and all(n == 1 for _, n in order):
            return True
        if not self.native.runs_any_step:
            return False
        # Decodes and drafts being verified: a few tokens a sequence, each attending over its context as a
        # decode row does, whatever that context's length (the cut below is for prefill chunks)
        if all(n == len(req.draft) + 1 for req, n in order):
            return True
        return self._native_attention_fits(order)

    def _native_attention_fits(self, order: list[tuple[Request, int]]) -> bool:
        """The native step attends one token at a time (each over its own context); past this many context
        positions per token on average, torch's prefill attention, which shares each key among a chunk's
        tokens, is faster."""
        tokens = sum(n for _, n in order)
        positions = sum(n * (req.num_computed_tokens + (n + 1) / 2) for req, n in order)
        return positions <= NATIVE_MAX_MEAN_CONTEXT * tokens

    def _native_forward(
        self, order: list[tuple[Request, int]], input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        assert self.native is not None
        num_blocks = max(len(req.block_table) for req, _ in order)
        # padded with block 0: the extension reads a row's table only up to its own context length
        tables = torch.tensor([req.block_table + [0] * (num_blocks - len(req.block_table)) for req, _ in order])
        if len(order) < len(input_ids):  # a prefill chunk: a row per token, each with its sequence's table
            tables = tables.repeat_interleave(torch.tensor([n for _, n in order]), dim=0)
        return self.native.forward(input_ids, positions, slots, tables, positions + 1)

    @staticmethod
    def _decodes_first(batch: ScheduledBatch) -> list[tuple[Request, int]]:
        pairs = list(zip(batch.requests, batch.num_tokens, strict=True))
        return [p for p in pairs if p[1] == 1] + [p for p in pairs if p[1] > 1]

    def _flatten(self, order: list[tuple[Request, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        bs = self.kv.block_size
        for req, n in order:
            start = req.num_computed_tokens
            for p in range(start, start + n):
                ids.append(req.token_id(p))
                pos.append(p)
                slots.append(req.block_table[p // bs] * bs + p % bs)
        as_long = torch.long
        return torch.tensor(ids, dtype=as_long), torch.tensor(pos, dtype=as_long), torch.tensor(slots, dtype=as_long)

    def _metadata(self, order: list[tuple[Request, int]], slots: torch.Tensor) -> AttentionMetadata:
        decodes = [req for req, n in order if n == 1]
        meta = AttentionMetadata(slots, len(decodes), None, {}, [])
        if decodes:
            lens = [r.num_computed_tokens + 1 for r in decodes]
            meta.decode_context_index = self._context_index(decodes, max(lens), lens)
            meta.decode_masks = {w: decode_mask(lens, w, self.dtype, self.num_kv_heads) for w in self.windows}
        offset = len(decodes)
        for req, n in order[len(decodes) :]:
            start = req.num_computed_tokens
            meta.prefills.append(
                PrefillSegment(
                    offset,
                    offset + n,
                    start,
                    self._context_index([req], start + n)[0] if start > 0 else None,
                    {w: self._chunk_mask(start, n, w) for w in self.windows},
                )
            )
            offset += n
        return meta

    def _chunk_mask(self, start: int, n: int, window: int | None) -> torch.Tensor | None:
        """The chunk's mask, or None where plain causal attention is the same."""
        if start == 0 and (window is None or n <= window):
            return None
        return chunk_mask(start, n, window, self.dtype)

    def _context_index(self, reqs: list[Request], length: int, lens: list[int] | None = None) -> torch.Tensor:
        """[len(reqs), length] cache slots of positions 0..length-1; past a row's own length (`lens`): slot 0."""
        bs = self.kv.block_size
        num_blocks = -(-length // bs)
        table = torch.zeros(len(reqs), num_blocks, dtype=torch.long)
        for i, req in enumerate(reqs):
            row = req.block_table[:num_blocks]
            table[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        pos = torch.arange(length)
        index = table[:, pos // bs] * bs + pos % bs
        if lens is not None:
            index.masked_fill_(pos.unsqueeze(0) >= torch.tensor(lens).unsqueeze(1), 0)
        return index

    @staticmethod
    def _sampling_rows(order: list[tuple[Request, int]]) -> list[tuple[Request, range]]:
        """The requests that sample this step and the rows they sample from: the last one, or with a
        draft of k tokens the last k + 1 (after the last known token and after each draft token)."""
        picks, offset = [], 0
        for req, n in order:
            offset += n
            if req.num_computed_tokens + n == req.num_scheduled_tokens:
                picks.append((req, range(offset - len(req.draft) - 1, offset)))
        return picks
