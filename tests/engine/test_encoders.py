"""The encoders' engine (engine/embedder.py): one thread per model taking the waiting requests together, and
what it does when a request is bad, the queue is full, or the model was shut down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tiny_models import make_cross_encoder
from tricklm.engine import embedder as encoders
from tricklm.engine.embedder import Embedder, EncoderBusy, EncoderStopped, Reranker
from tricklm.model.config import ModelLoadError
from tricklm.model.resolve import resolve_model

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def embedder() -> Iterator[Embedder]:
    model = Embedder(resolve_model(MODEL), MODEL)
    yield model
    model.shutdown()


def test_requests_waiting_together_share_batches_and_get_their_own_rows(embedder: Embedder) -> None:
    texts = ["one short text", "another, somewhat longer text than that", "a third"]
    alone = [embedder.embed(embedder.tokenize([t]))[0] for t in texts]
    futures = [embedder.embed_later(embedder.tokenize([t])) for t in texts]  # queued at once: one pass
    for want, future in zip(alone, futures, strict=True):
        torch.testing.assert_close(future.result(timeout=60)[0], want, atol=1e-5, rtol=0)


def test_a_bad_request_fails_alone_not_the_requests_batched_with_it(embedder: Embedder) -> None:
    good = encoders._Job(embedder.tokenize(["fine"]), None, embedder.model, embedder.dimensions, 0)
    bad = encoders._Job([[101, embedder.config.vocab_size + 5, 102]], None, embedder.model, embedder.dimensions, 0)
    worker = encoders._Worker(embedder)
    try:
        worker._run([good, bad])  # as the thread runs jobs it took together
        assert good.done.result().shape == (1, embedder.dimensions)
        with pytest.raises(IndexError):
            bad.done.result()
    finally:
        worker.stop()


def test_a_full_queue_refuses_and_a_stopped_encoder_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Embedder(resolve_model(MODEL), MODEL)
    ids = model.tokenize(["text"])
    model.embed(ids)  # the thread is up
    monkeypatch.setattr(encoders, "MAX_QUEUED_JOBS", 0)
    with pytest.raises(EncoderBusy, match="retry later"):
        model.embed_later(ids)
    monkeypatch.undo()
    model.shutdown()
    with pytest.raises(EncoderStopped):
        model.embed_later(ids)


def test_a_cross_encoder_of_several_labels_is_no_reranker(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="one label, this cross-encoder has 3"):
        Reranker(make_cross_encoder(tmp_path / "nli", labels=3))


def test_a_long_query_leaves_the_document_room_or_is_refused(tmp_path: Path) -> None:
    reranker = Reranker(make_cross_encoder(tmp_path / "ce"))
    limit = reranker.max_tokens  # 128: [CLS] query [SEP] document [SEP]
    longest = "why " * (limit - 4)  # one token each: one left for the document
    (pair,) = reranker.pairs(longest, ["a long document " * 50], truncate=True)
    assert len(pair.ids) == limit and pair.type_ids.count(1) == 2  # a document token and its [SEP]
    assert len(reranker.score([pair])) == 1
    with pytest.raises(encoders.InputTooLong, match="the query has 125 tokens"):
        reranker.pairs("why " * (limit - 3), ["doc"], truncate=True)
    reranker.shutdown()
