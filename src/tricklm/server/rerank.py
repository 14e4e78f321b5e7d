"""`POST /v1/rerank` (also `/rerank` and Cohere's `/v2/rerank`): documents ordered by their relevance to a query,
in the shape Jina's and Cohere's APIs use and llama-server and vLLM accept, from a cross-encoder
(engine/embedder.py's `Reranker`).

Each document is read together with the query as one input and scored by the model's head (after the
activation the folder names: a sigmoid unless it says Identity, as sentence-transformers' CrossEncoder
does). Documents are strings or `{"text": ...}` objects. A document too long for the model is cut from its
end, as Cohere's API does; `truncate: false` refuses it instead.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from tricklm.server.errors import documented_errors
from tricklm.server.openai.embeddings import encoder_errors, encoder_result, encoder_usage
from tricklm.server.openai.protocol import OpenAIBody
from tricklm.server.state import get_state

MAX_DOCUMENTS = 1000  # Cohere's limit a request


class RerankDocument(BaseModel):
    text: str


class RerankRequest(OpenAIBody):
    model: str | None = None
    query: str = Field(min_length=1)
    documents: list[str | RerankDocument] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    top_n: int | None = Field(None, ge=1, description="the best N results (default: all)")
    return_documents: bool = False
    truncate: bool = True

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage


router = APIRouter()


@router.post("/rerank", include_in_schema=False)
@router.post("/v2/rerank", include_in_schema=False)
@router.post("/v1/rerank", responses={200: {"model": RerankResponse}, **documented_errors(400, 404, 429, 503, 504)})
async def rerank(body: RerankRequest, request: Request) -> JSONResponse:
    """The documents by relevance to the query, most relevant first, from a reranking model."""
    state = get_state(request)
    name, reranker = state.require_reranker(body.model)
    texts = body.texts()
    hint = "" if body.truncate else "; send truncate: true to cut long documents"
    with encoder_errors("documents", hint):
        pairs = await run_in_threadpool(reranker.pairs, body.query, texts, body.truncate)
        scores = [float(s) for s in (await encoder_result(state, reranker.score_later(pairs)))[:, 0]]
    tokens = sum(len(p.ids) for p in pairs)
    state.metrics.observe_encoder(name, len(texts), tokens)
    # Highest first; equal scores keep the documents' order (a stable sort), so a reply never shuffles
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[: body.top_n]
    results: list[dict[str, Any]] = []
    for i in order:
        result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if body.return_documents:
            result["document"] = {"text": texts[i]}
        results.append(result)
    usage = encoder_usage(tokens)
    return JSONResponse({"id": f"rerank-{uuid.uuid4().hex}", "model": name, "results": results, "usage": usage})
