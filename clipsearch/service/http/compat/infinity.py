"""infinity's own routes (infinity_emb's fastapi_schemas/pymodels.py and infinity_server.py):
`POST /embeddings` (OpenAI's body, `modality` text or image), `GET /models`, and `POST /rerank`
(Cohere's body, as litellm's `infinity/` provider sends it), so that clients pointed at an
infinity server root, litellm's `infinity/` provider among them, work against clipsearch.

`/rerank` scores a query text against documents that are texts or, with `modality: "image"`
(an extension), images, with the served model: `relevance_score` is the model's probability
(softmax over the documents of logit_scale x cosine, as CLIP's zero-shot; for SigLIP each
pair's sigmoid), or with `raw_scores` the cosine itself.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from clipsearch_client.aio import gather_or_cancel
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from clipsearch.core.errors import NotFound
from clipsearch.model import zeroshot
from clipsearch.service.http.bodies import body_schema, read_body
from clipsearch.service.http.compat.openai import (
    OPENAI_ERRORS,
    InfinityEmbeddingsRequest,
    embed_openai_style,
    infinity_answer,
)
from clipsearch.service.http.deps import State, client_gone, service_state
from clipsearch.service.http.routes import json_response
from clipsearch.service.http.schemas import Positive

router = APIRouter(tags=["infinity API"])


@router.post("/embeddings", responses=OPENAI_ERRORS, openapi_extra=body_schema(InfinityEmbeddingsRequest))
async def embeddings(request: Request) -> Response:
    """infinity's embeddings: OpenAI's answer with infinity's `id` and `created`."""
    answer, _ = await embed_openai_style(request, InfinityEmbeddingsRequest)
    return json_response(infinity_answer(answer))


@router.get("/models", responses=OPENAI_ERRORS)
async def models(state: State) -> Response:
    """The one served model, as infinity lists its models."""
    return json_response({"object": "list", "data": [{
        "id": state.settings.served_name, "object": "model", "owned_by": "clipsearch", "created": 0,
        "backend": "torch", "stats": {}, "capabilities": ["embed", "image_embed", "rerank"]}]})


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # Cohere's other fields (rank_fields, max_chunks_per_doc, ...)

    query: Annotated[str, Field(min_length=1)] = Field(description="the query text")
    documents: Annotated[list[str], Field(min_length=1)] = Field(
        description="texts, or with modality image, images (base64 or data: URIs); up to openai_max_inputs")
    model: str | None = Field(None, description="the served model's name, if given")
    top_n: Positive | None = Field(None, description="only the best this many")
    return_documents: StrictBool = Field(False, description="send each document back with its score")
    raw_scores: StrictBool = Field(False, description="the cosine instead of the model's probability")
    modality: Literal["text", "image"] = Field("text", description="what `documents` hold (an extension)")


@router.post("/rerank", responses=OPENAI_ERRORS, openapi_extra=body_schema(RerankRequest))
async def rerank(request: Request) -> Response:
    """Documents ordered by how well they match the query, scored by the served model."""
    state, disconnected = service_state(request), client_gone(request)
    body = await read_body(request, RerankRequest, state.settings)
    engine, name, model = state.engine, state.settings.served_name, state.model
    if body.model is not None and body.model != name:
        raise NotFound(f"model {body.model!r} is not served here; this server serves {name!r}", field="model")
    engine.check_count(len(body.documents), state.settings.openai_max_inputs, field="documents")
    image = body.modality == "image"
    documents = body.documents if image else [model.context_text(t) for t in body.documents]
    query_text = model.context_text(body.query)
    query, docs = await gather_or_cancel(
        engine.embed_texts([query_text], field="query", disconnected=disconnected, checked=True),
        engine.embed_many(documents, body.modality, field="documents", disconnected=disconnected, checked=True))
    tokens = await run_in_threadpool(model.count_tokens, [query_text] if image else [query_text, *documents])
    cosine, probs = zeroshot.similarity(query, docs, model.logit_scale, model.logit_bias)
    scores = cosine[0] if body.raw_scores else probs[0]
    order = np.argsort(-scores, kind="stable")[: body.top_n]
    results = [{"relevance_score": float(scores[i]), "index": int(i),
                **({"document": body.documents[i]} if body.return_documents else {})} for i in order]
    return json_response({"object": "rerank", "results": results, "model": name,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                          **infinity_answer({})})
