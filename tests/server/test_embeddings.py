"""Embeddings from all-MiniLM-L6-v2 (shipped offline in a PyPI package) through the official `openai`
client, against sentence-transformers' own vectors for 102 varied texts (stored: computed with
`SentenceTransformer(folder).encode(texts, normalize_embeddings=True)`, sentence-transformers 6.3.0)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from tiny_models import make_decoder_embedder, write_bert_gguf
from tricklm.engine import embedder as encoders
from tricklm.engine.embedder import DTYPE_ENV, Embedder
from tricklm.model.bert import encoder_task
from tricklm.model.resolve import resolve_model
from tricklm.server.app import create_app
from tricklm.server.testing import running_server

MODEL = "all-MiniLM-L6-v2"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "embeddings"


@pytest.fixture(scope="module")
def embedding_server() -> Iterator[str]:
    embedder = Embedder(resolve_model(MODEL), MODEL)
    with running_server(create_app(embedder=embedder)) as base:
        yield base


@pytest.fixture(scope="module")
def client(embedding_server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{embedding_server}/v1", api_key="x", max_retries=0) as c:
        yield c


def test_vectors_match_sentence_transformers(client: openai.OpenAI) -> None:
    texts = json.loads((FIXTURES / f"{MODEL}-texts.json").read_text(encoding="utf-8"))
    want = np.load(FIXTURES / f"{MODEL}-vectors.npy")
    assert len(texts) >= 100
    # the last text is over the model's 256 tokens: sentence-transformers cut it, as truncate does
    got = client.embeddings.create(model=MODEL, input=texts, extra_body={"truncate": True})
    vectors = np.array([d.embedding for d in sorted(got.data, key=lambda d: d.index)], dtype=np.float32)
    cosines = (vectors * want).sum(axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.min() >= 0.9999, cosines.argmin()
    assert got.usage.prompt_tokens > len(texts) and got.model == MODEL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_both_matmul_types_are_within_the_bound(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """Whichever type the load-time probe picks on a CPU, its vectors are within cosine 0.9999."""
    monkeypatch.setenv(DTYPE_ENV, dtype)
    embedder = Embedder(resolve_model(MODEL), MODEL)
    assert str(embedder.model.compute_dtype) == f"torch.{dtype}"
    texts = json.loads((FIXTURES / f"{MODEL}-texts.json").read_text(encoding="utf-8"))
    want = np.load(FIXTURES / f"{MODEL}-vectors.npy")
    vectors = embedder.embed([embedder.fit(ids, truncate=True) for ids in embedder.tokenize(texts)]).numpy()
    cosines = (vectors * want).sum(axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.min() >= 0.9999, (dtype, cosines.min())
    embedder.shutdown()


def test_a_bert_gguf_as_llama_cpp_writes_it_gives_the_same_vectors(tmp_path: Path) -> None:
    gguf = write_bert_gguf(resolve_model(MODEL), tmp_path / "minilm-f16.gguf")
    embedder = Embedder(resolve_model(str(gguf)))
    texts = json.loads((FIXTURES / f"{MODEL}-texts.json").read_text(encoding="utf-8"))
    want = np.load(FIXTURES / f"{MODEL}-vectors.npy")
    # the file says 512 positions where sentence-transformers' folder reads 256: cut as it did
    vectors = embedder.embed([ids[:255] + ids[-1:] if len(ids) > 256 else ids for ids in embedder.tokenize(texts)])
    cosines = (vectors.numpy() * want).sum(axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.min() >= 0.9999, cosines.argmin()  # float16 matrices, as the converter's default writes them
    assert embedder.max_tokens == 512 and embedder.config.pooling == "mean" and embedder.config.normalize


def test_a_decoder_embedding_model_pools_its_last_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Qwen3-Embedding's layout (a decoder with last-token pooling): each vector is transformers' last-layer
    state at the text's last token, normalized, whatever else is in the batch."""
    from transformers import AutoModel

    monkeypatch.setenv(DTYPE_ENV, "float32")
    folder = make_decoder_embedder(tmp_path / "qwen3-embedding")
    assert encoder_task(folder) == "embed"
    embedder = Embedder(folder, "qwen3-embedding")
    inputs = embedder.tokenize(["a short text", "a somewhat longer text than the first one, " * 3, "x"])
    got = embedder.embed(inputs)
    reference = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    for ids, vector in zip(inputs, got, strict=True):
        with torch.no_grad():
            state = reference(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        torch.testing.assert_close(vector, torch.nn.functional.normalize(state, dim=0), atol=1e-5, rtol=0)
    with running_server(create_app(embedder=embedder)) as base:
        r = httpx.post(f"{base}/v1/embeddings", json={"input": ["a short text"]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 64
        r = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400  # served as an embedding model, though its weights could generate
    embedder.shutdown()


def test_formats_dimensions_and_token_inputs(client: openai.OpenAI, embedding_server: str) -> None:
    text = "The cat sat on the mat."
    plain = np.array(client.embeddings.create(model=MODEL, input=text, encoding_format="float").data[0].embedding)
    raw = httpx.post(f"{embedding_server}/v1/embeddings", json={"input": text, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, plain, rtol=0, atol=1e-7)
    short = np.array(client.embeddings.create(model=MODEL, input=text, dimensions=64).data[0].embedding)
    assert len(short) == 64 and abs(np.linalg.norm(short) - 1) < 1e-5
    np.testing.assert_allclose(short, plain[:64] / np.linalg.norm(plain[:64]), atol=1e-6)
    ids = httpx.post(f"{embedding_server}/tokenize", json={"prompt": text}).status_code  # a generating route
    assert ids == 400
    tokens = [101, 1996, 4937, 2938, 2006, 1996, 13523, 1012, 102]  # [CLS] the cat sat on the mat . [SEP]
    by_ids = np.array(client.embeddings.create(model=MODEL, input=[tokens]).data[0].embedding)
    np.testing.assert_allclose(by_ids, plain, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"input": ""}, "empty"),
        ({"input": []}, "empty"),
        ({"input": ["ok", ""]}, "empty"),
        ({"input": "word " * 400}, "truncate"),
        ({"input": "x", "dimensions": 1000}, "at most 384"),
        ({"input": [[1, 2, 999999]]}, "token ids"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_input_is_a_400(embedding_server: str, body: dict[str, object], words: str) -> None:
    r = httpx.post(f"{embedding_server}/v1/embeddings", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert words in json.dumps(r.json())


def test_a_full_encoder_queue_is_a_429(embedding_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoders, "MAX_QUEUED_JOBS", 0)
    r = httpx.post(f"{embedding_server}/v1/embeddings", json={"input": "hi"}, timeout=30)
    assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
    monkeypatch.undo()
    assert httpx.post(f"{embedding_server}/v1/embeddings", json={"input": "hi"}, timeout=30).status_code == 200


def test_generating_routes_refuse_an_embedding_model_and_back(embedding_server: str, tiny_server: str) -> None:
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = httpx.post(f"{embedding_server}/v1/chat/completions", json=chat, timeout=30)
    assert r.status_code == 400 and "/v1/embeddings" in r.json()["error"]["message"]
    models = httpx.get(f"{embedding_server}/v1/models", timeout=30).json()["data"]
    assert models[0]["id"] == MODEL and models[0]["max_model_len"] == 256
    assert httpx.get(f"{embedding_server}/health", timeout=30).status_code == 200
    r = httpx.post(f"{tiny_server}/v1/embeddings", json={"input": "hi"}, timeout=30)
    assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
