"""/v1/rerank from tiny random cross-encoders (BERT's and XLM-R's layouts, transformers' own files) against
transformers' scores for the same pairs, and the route's shapes and refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

from tiny_models import make_cross_encoder
from tricklm.engine.embedder import Reranker
from tricklm.server.app import create_app
from tricklm.server.testing import running_server

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    "The mitochondria is the powerhouse of the cell.",
    "Berlin is the capital of Germany; Paris is that of France.",
    "def capital(country): return CAPITALS[country]",
    "Paris " * 300,  # longer than the model reads: its end is cut
    "La capitale de la France est Paris.",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rerankers")
    return {
        "bert": make_cross_encoder(root / "bert"),
        "xlmr-logits": make_cross_encoder(root / "xlmr", roberta=True, sigmoid=False),
    }


@pytest.fixture(scope="module")
def server(folders: dict[str, Path]) -> Iterator[str]:
    models = [Reranker(folder, name) for name, folder in folders.items()]
    with running_server(create_app(models=models)) as base:
        yield base


def _reference(folder: Path, documents: list[str], max_length: int, sigmoid: bool) -> list[float]:
    """transformers' scores for (QUERY, document) pairs, its tokenizer cutting only the document."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="[PAD]")
    batch = tok(
        [QUERY] * len(documents),
        documents,
        padding=True,
        truncation="only_second",
        max_length=max_length,
        return_token_type_ids=True,
        return_tensors="pt",
    )
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    if model.config.type_vocab_size == 1:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    with torch.no_grad():
        logits = model(**batch).logits[:, 0]
    return (logits.sigmoid() if sigmoid else logits).tolist()


@pytest.mark.parametrize(("name", "sigmoid"), [("bert", True), ("xlmr-logits", False)])
def test_scores_match_transformers_and_come_sorted(
    server: str, folders: dict[str, Path], name: str, sigmoid: bool
) -> None:
    body = {"model": name, "query": QUERY, "documents": DOCUMENTS, "return_documents": True}
    r = httpx.post(f"{server}/v1/rerank", json=body, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    max_tokens = httpx.get(f"{server}/v1/models/{name}", timeout=10).json()["max_model_len"]
    want = _reference(folders[name], DOCUMENTS, max_tokens, sigmoid)
    assert sorted(x["index"] for x in results) == list(range(len(DOCUMENTS)))
    for result in results:
        assert abs(result["relevance_score"] - want[result["index"]]) < 1e-4, result
        assert result["document"]["text"] == DOCUMENTS[result["index"]]
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    assert r.json()["model"] == name and r.json()["usage"]["total_tokens"] > len(DOCUMENTS) * 8
    if not sigmoid:
        assert any(not 0 <= s <= 1 for s in scores)  # raw logits, as the folder's Identity asks


def test_top_n_equal_scores_and_the_other_paths(server: str) -> None:
    documents = ["same text", {"text": "other text"}, "same text"]
    body = {"model": "bert", "query": QUERY, "documents": documents, "top_n": 2}
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        r = httpx.post(server + path, json=body, timeout=60)
        assert r.status_code == 200, (path, r.text)
        results = r.json()["results"]
        assert len(results) == 2 and "document" not in results[0]
    full = httpx.post(f"{server}/v1/rerank", json={**body, "top_n": 10}, timeout=60).json()["results"]
    same = [x["index"] for x in full if x["index"] != 1]
    assert same == [0, 2]  # equal scores keep the documents' order


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"query": "", "documents": ["a"]}, "query"),
        ({"query": "q", "documents": []}, "documents"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
        ({"query": "q", "documents": ["a"] * 1001}, "documents"),
        ({"query": "q", "documents": [{"title": "a"}]}, "documents.0"),
        ({"query": "q", "documents": ["Paris " * 300], "truncate": False}, "truncate: true"),
        ({"query": "why " * 300, "documents": ["a"]}, "the query"),
        ({"model": "nope", "query": "q", "documents": ["a"]}, "does not exist"),
    ],
)
def test_bad_input_is_a_400_in_openais_shape(server: str, body: dict[str, object], words: str) -> None:
    r = httpx.post(f"{server}/v1/rerank", json={"model": "bert", **body}, timeout=30)
    assert r.status_code in (400, 404), r.text
    assert words in r.json()["error"]["message"] or words in str(r.json()["error"].get("param"))
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_a_reranker_refuses_the_other_routes_and_they_refuse_it(server: str, tiny_server: str) -> None:
    chat = {"model": "bert", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = httpx.post(f"{server}/v1/chat/completions", json=chat, timeout=30)
    assert r.status_code == 400 and "/v1/rerank" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/embeddings", json={"model": "bert", "input": "hi"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_embedding"
    r = httpx.post(f"{tiny_server}/v1/rerank", json={"query": "q", "documents": ["a"]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_reranker"
