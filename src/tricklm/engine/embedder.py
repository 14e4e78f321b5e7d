"""Encoder models' engines: texts in, one vector each out (`Embedder`), or a query and documents in, a
relevance score each out (`Reranker`).

An encoder computes a whole input at once and keeps nothing between requests, so there is no scheduler
or cache here. Every forward pass runs on one thread of the engine's own (`_Worker`): requests queue their
inputs there, and the inputs of the requests waiting together are sorted by length and run in padded
batches of similar lengths (little padding), so a flood of one-text requests runs as batches.

One thread also keeps torch's thread teams apart: each thread that runs a parallel op gets its own OpenMP
team, and with more OpenMP threads than cores the runtime stops spinning between parallel regions, so a
generating engine's steps (hundreds of regions each) ran twice as slow for good once embedding requests
had run on the server's request threads. Beside a generating model (`background`), the encoder computes on
one torch thread at a lower priority: the engine's steps come first, embeddings take what is left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Encoding
from tokenizers import Tokenizer as HFTokenizer

from tricklm.model.bert import DecoderEncoder, Encoder, EncoderConfig, load_encoder
from tricklm.model.config import ModelLoadError
from tricklm.model.native import isa

logger = logging.getLogger("tricklm")

# Padded tokens a forward pass may hold (batch x longest input): batches of 8x this ran at half the speed
# (benchmarks/README.md, "Embeddings")
MAX_BATCH_TOKENS = 2048
# Tokens of waiting requests run together; the first waiting request always goes whole, however long
MAX_SHARED_TOKENS = 4 * MAX_BATCH_TOKENS
MAX_QUEUED_JOBS = 256  # requests waiting for one encoder before more are refused (a 429 from the server)
BACKGROUND_NICE = 10  # added to the encoder thread's niceness beside a generating model
STOP_SECONDS = 30.0  # a shutdown waits this long at most for the encoder's pass in progress


class InputTooLong(ValueError):
    """An input is longer than the model reads; the message says by how much."""


class EncoderEngine:
    """What the embedding and reranking engines share: the folder's encoder and tokenizer, the batching."""

    task = ""

    def __init__(self, folder: Path, name: str | None = None) -> None:
        start = time.monotonic()
        self.config = EncoderConfig.from_folder(folder)
        self.model = load_encoder(folder)
        self.model.compute_dtype = choose_compute_dtype(self.model, self.task == "embed")
        path = folder / "tokenizer.json"
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on missing/corrupt files
            raise ModelLoadError(f"{path} could not be read: {e}") from None
        # sentence-transformers cuts inputs itself, at max_seq_length: the file's own settings do not apply
        self._tok.no_padding()
        self._tok.no_truncation()
        self.model_name = name or folder.name
        # token ids a request may send: in the tokenizer and in the model's table
        self.vocab_size = min(self._tok.get_vocab_size(with_added_tokens=True), self.config.vocab_size)
        self.background = False  # beside a generating model: one torch thread, lower priority (set before use)
        self._worker: _Worker | None = None
        self._worker_lock = threading.Lock()
        self._closed = False
        self.memory_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        dtype = str(self.model.compute_dtype).removeprefix("torch.")
        logger.info(
            "loaded %s (%s) from %s in %.1fs: weights %.0f MiB, matmuls in %s",
            self.model_name,
            self.task,
            folder,
            time.monotonic() - start,
            self.memory_bytes / 2**20,
            dtype,
        )

    @property
    def max_tokens(self) -> int:
        return self.config.max_seq_length

    def shutdown(self) -> None:
        with self._worker_lock:
            self._closed = True
            if self._worker is not None:
                self._worker.stop()

    def _submit(
        self, inputs: list[list[int]], types: list[list[int]] | None, run: Callable[..., torch.Tensor], width: int
    ) -> Future[torch.Tensor]:
        """run(ids, mask[, types]) for every input, on the engine's thread with other requests' inputs: a
        future of [len(inputs), width] in input order (EncoderBusy, EncoderStopped if it cannot be queued)."""
        with self._worker_lock:
            if self._closed:
                raise EncoderStopped(f"{self.model_name} was shut down")
            if self._worker is None:
                self._worker = _Worker(self)
        return self._worker.submit(_Job(inputs, types, run, width, self.config.pad_token_id))


def padded_batches(
    inputs: list[list[int]], types: list[list[int]] | None, run: Callable[..., torch.Tensor], width: int, pad: int
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
        ids = torch.tensor([inputs[i] + [pad] * (longest - len(inputs[i])) for i in rows])
        mask = torch.tensor([[1] * len(inputs[i]) + [0] * (longest - len(inputs[i])) for i in rows])
        args = [ids, mask]
        if types is not None:
            args.append(torch.tensor([types[i] + [0] * (longest - len(types[i])) for i in rows]))
        out[rows] = run(*args)
        start = end
    return out


DTYPE_ENV = "TRICKLM_ENCODER_DTYPE"  # float32, bfloat16 or auto (the default)
BF16_MIN_GAIN = 1.2  # bfloat16 matmuls are taken when at least this much faster than float32


def choose_compute_dtype(model: Encoder | DecoderEncoder, may_round: bool) -> torch.dtype:
    """The matmuls' type: $TRICKLM_ENCODER_DTYPE if set, else, for an embedding model (`may_round`),
    bfloat16 when a probe batch runs clearly faster in it on this CPU (a Zen 4 or a Xeon with AVX-512 BF16
    or AMX: about twice as fast, every all-MiniLM-L6-v2 vector of the tests within cosine 0.9999 of
    float32's), else float32: AVX2 CPUs have no bfloat16 arithmetic (TRICKLM_ISA=avx2 or scalar stands for
    one), and a reranker's scores are compared with each other and with other servers' to 1e-4."""
    forced = os.environ.get(DTYPE_ENV, "auto")
    if forced in ("float32", "bfloat16"):
        return getattr(torch, forced)  # type: ignore[no-any-return]
    if forced != "auto":
        raise ModelLoadError(f"{DTYPE_ENV} must be float32, bfloat16 or auto, not {forced!r}")
    if not may_round:
        return torch.float32
    try:
        if isa.forced() in ("scalar", "avx2"):
            return torch.float32
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    ids = torch.randint(1000, 2000, (8, 64))
    mask = torch.ones_like(ids)
    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    for dtype in (torch.float32, torch.bfloat16) * 4:  # interleaved, so that a busy moment hits both
        model.compute_dtype = dtype
        start = time.perf_counter()
        model(ids, mask)
        times[dtype].append(time.perf_counter() - start)
    # the fastest of each after its first (kernels are set up on first use): a single timing was noisy enough
    # on a shared machine to pick float32 where bfloat16 is twice as fast
    fp32, bf16 = (min(times[d][1:]) for d in (torch.float32, torch.bfloat16))
    return torch.bfloat16 if fp32 >= BF16_MIN_GAIN * bf16 else torch.float32


class EncoderBusy(RuntimeError):
    """More requests wait for the encoder than it queues (MAX_QUEUED_JOBS): the caller is told to retry."""


class EncoderStopped(RuntimeError):
    """The encoder was shut down: nothing more runs on it."""


@dataclass
class _Job:
    inputs: list[list[int]]
    types: list[list[int]] | None
    run: Callable[..., torch.Tensor]
    width: int
    pad: int
    done: Future[torch.Tensor] = field(default_factory=Future)

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.inputs)


class _Worker:
    """The thread every forward pass of one encoder runs on, taking the waiting requests together. Callers
    get a future: a server awaits it on its event loop, holding no thread of its pool while it waits."""

    def __init__(self, owner: EncoderEngine) -> None:
        self._owner = owner
        self._in_background = False
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._queued = 0  # jobs submitted and not yet taken (approximate across threads: a bound, not a count)
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=f"tricklm-encoder-{owner.model_name}", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> Future[torch.Tensor]:
        with self._lock:
            if self._stopped:
                raise EncoderStopped(f"{self._owner.model_name} was shut down")
            if self._queued >= MAX_QUEUED_JOBS:
                raise EncoderBusy(f"{self._queued} requests are waiting for {self._owner.model_name}; retry later")
            self._queued += 1
            self._jobs.put(job)
        return job.done

    def stop(self) -> None:
        """Jobs still queued fail with EncoderStopped; the one running finishes, and so does the thread
        (within STOP_SECONDS): a process that exits while a thread is still inside torch's native code
        aborted in its teardown ("terminate called without an active exception")."""
        with self._lock:
            self._stopped = True
            self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=STOP_SECONDS)

    def _step_back(self) -> None:
        """One torch thread at a lower priority, once a generating model is served beside (it may load after
        this encoder served). torch's count also becomes the default of threads that start torch work later;
        the engines set theirs at every step."""
        if self._in_background or not self._owner.background:
            return
        self._in_background = True
        torch.set_num_threads(1)
        with contextlib.suppress(OSError, AttributeError):  # not Linux: the priority stays as it is
            niceness = os.getpriority(os.PRIO_PROCESS, 0) + BACKGROUND_NICE
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)

    def _take(self) -> _Job | None:
        job = self._jobs.get()
        with self._lock:
            self._queued -= job is not None
        return job

    def _serve(self) -> None:
        while (first := self._take()) is not None:
            self._step_back()
            jobs = [first]
            total = first.tokens
            while total < MAX_SHARED_TOKENS and not self._jobs.empty():
                job = self._take()
                if job is None:
                    self._jobs.put(None)  # stop after these
                    break
                jobs.append(job)
                total += job.tokens
            # a caller that stopped waiting (its client left, its time ran out) cancelled its future
            live = [job for job in jobs if job.done.set_running_or_notify_cancel()]
            if live:
                self._run(live)
        while (job := self._jobs.get_nowait() if not self._jobs.empty() else None) is not None:
            if job.done.set_running_or_notify_cancel():
                job.done.set_exception(EncoderStopped(f"{self._owner.model_name} was shut down"))

    def _run(self, jobs: list[_Job]) -> None:
        first = jobs[0]
        inputs = [x for job in jobs for x in job.inputs]
        types = None if first.types is None else [t for job in jobs for t in job.types or []]
        try:
            out = padded_batches(inputs, types, first.run, first.width, first.pad)
        except Exception as e:  # each request gets an error, never the thread's end
            if len(jobs) == 1:
                first.done.set_exception(e)
                return
            for job in jobs:  # each alone, so that only the request at fault gets it
                try:
                    job.done.set_result(padded_batches(job.inputs, job.types, job.run, job.width, job.pad))
                except Exception as alone:
                    job.done.set_exception(alone)
            return
        start = 0
        for job in jobs:
            job.done.set_result(out[start : start + len(job.inputs)])
            start += len(job.inputs)


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

    def embed_later(self, inputs: list[list[int]]) -> Future[torch.Tensor]:
        """A future of [len(inputs), dimensions] float32, in input order."""
        return self._submit(inputs, None, self.model, self.dimensions)

    def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """[len(inputs), dimensions] float32, in input order (blocks the caller)."""
        return self.embed_later(inputs).result()


class Reranker(EncoderEngine):
    """A cross-encoder: each (query, document) pair read as one input, as the tokenizer's pair template
    writes it ([CLS] query [SEP] document [SEP], the document as segment 1), scored by the model's head."""

    task = "rerank"

    def __init__(self, folder: Path, name: str | None = None) -> None:
        super().__init__(folder, name)
        if self.config.num_labels != 1:
            # a score per label (an NLI model's three) is not one relevance to sort by
            raise ModelLoadError(f"{folder}: a reranker has one label, this cross-encoder has {self.config.num_labels}")
        # What the pair template adds around the query and a document (3 for BERT, 4 for RoBERTa)
        self._pair_tokens = self._tok.post_processor.num_special_tokens_to_add(True) if self._tok.post_processor else 0
        # A second tokenizer that cuts the document of a pair that is too long (truncation is a tokenizer's
        # state, and the first one must not cut)
        self._cutter = HFTokenizer.from_str(self._tok.to_str())
        self._cutter.enable_truncation(self.max_tokens, strategy="only_second")

    def pairs(self, query: str, documents: list[str], truncate: bool) -> list[Encoding]:
        """Each pair's encoding within the model's length: a long document is cut from its end (the query
        is kept whole) when `truncate`, else refused; a query that leaves no room is refused either way."""
        limit = self.max_tokens
        query_len = len(self._tok.encode(query, add_special_tokens=False).ids)
        if query_len + self._pair_tokens >= limit:
            raise InputTooLong(f"the query has {query_len} tokens: it leaves no room in this model's {limit}")
        encodings: list[Encoding] = self._tok.encode_batch([(query, d) for d in documents])
        for i, enc in enumerate(encodings):
            if len(enc.ids) <= limit:
                continue
            if not truncate:
                raise InputTooLong(f"document {i} with the query has {len(enc.ids)} tokens, more than {limit}")
            encodings[i] = self._cutter.encode(query, documents[i])
        return encodings

    def score_later(self, encodings: list[Encoding]) -> Future[torch.Tensor]:
        """A future of each pair's relevance [len(encodings), 1] (the label's score, after the model's
        activation), in input order."""
        ids = [list(e.ids) for e in encodings]
        # RoBERTa-shaped models have one segment: their tokenizers write 0s, a BERT tokenizer would write 1s
        types = [list(e.type_ids) if self.config.type_vocab_size > 1 else [0] * len(e.ids) for e in encodings]
        assert isinstance(self.model, Encoder)  # cross-encoders are BERT-family
        return self._submit(ids, types, self.model.score, self.config.num_labels)

    def score(self, encodings: list[Encoding]) -> list[float]:
        """Each pair's relevance, in input order (blocks the caller)."""
        return [float(s) for s in self.score_later(encodings).result()[:, 0]]
