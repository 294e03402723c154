"""Thin routes: validate, call the engine or the index, build the response."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from clipsearch_client.aio import gather_or_cancel
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from clipsearch.core.errors import InvalidInput, NotFound, OutOfRange
from clipsearch.index.filters import compile_filter
from clipsearch.index.search import Hit, IndexSet, LoadedIndex, SearchParams
from clipsearch.model import zeroshot
from clipsearch.service.engine import SearchJob
from clipsearch.service.http.bodies import body_schema, read_body
from clipsearch.service.http.deps import AdminAuth, State, client_gone, service_state
from clipsearch.service.http.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    ImageSearchRequest,
    SearchResponse,
    SimilarityRequest,
    SimilarityResponse,
    SimilarSearchRequest,
    TextSearchRequest,
    VectorSearchRequest,
)
from clipsearch.service.state import ServiceState

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 408, 413, 422, 429, 503, 504)
}


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status_code,
                    media_type="application/json")


@router.post("/embed", response_model=EmbedResponse, responses=_ERRORS,
             openapi_extra=body_schema(EmbedRequest, form=True))
async def embed(request: Request) -> Response:
    """Embed texts and/or images; L2-normalized vectors in input order."""
    state = service_state(request)
    body = await read_body(request, EmbedRequest, state.settings)
    disconnected = client_gone(request)
    engine = state.engine
    engine.check_count(len(body.texts) + len(body.images))
    texts, images = await engine.embed_both(body.texts, body.images, disconnected=disconnected)
    return json_response({"model": state.model.info.spec, "dim": engine.dim, "texts": texts, "images": images})


def _hits(hits: list[Hit], current: IndexSet, index: LoadedIndex, vectors: bool,
          folded: list[list[Hit]] | None = None) -> list[dict[str, Any]]:
    stored = index.vectors_of(np.asarray([h.row for h in hits], np.int64)) if vectors and hits else None
    return [{"id": h.id, "score": h.score, "metadata": h.metadata, "text": h.text,
             "thumbnail": thumbnail_url(current.version, h.row) if index.has_thumbnail(h.row) else None,
             **({"vector": stored[i]} if stored is not None else {}),
             **({"duplicates": [d.id for d in folded[i]]} if folded is not None else {})}
            for i, h in enumerate(hits)]


async def _ready(vector: np.ndarray) -> np.ndarray:
    return vector


def thumbnail_url(version: str, row: int) -> str:
    return f"/thumbnails/{version}/{row}"


Searching = TextSearchRequest | ImageSearchRequest | SimilarSearchRequest | VectorSearchRequest


async def _job(body: Searching, state: ServiceState, index: LoadedIndex) -> SearchJob:
    """What the request searches: offset + k results (at most max_k), of the filter's rows.
    A filter's rows are found once per index version (in a thread: the first time walks the items)."""
    total = body.offset + body.k
    limit = state.settings.max_k
    if total > limit:  # k alone is in the schema (422); the sum of two fields is not (400)
        if body.offset == 0:
            raise OutOfRange(f"k: {total} is above the limit of {limit}", field="k")
        raise InvalidInput(f"offset: offset + k = {total} is above the limit of {limit}", field="offset")
    selection = None
    if body.filter is not None:
        flt = compile_filter(body.filter)
        selection = await run_in_threadpool(index.select, flt)
    return SearchJob(index, min(total, index.count), SearchParams(nprobe=body.nprobe, ef_search=body.ef_search),
                     selection)


def _search_response(hits: list[Hit], body: Searching, current: IndexSet, index: LoadedIndex) -> Response:
    page = hits[body.offset : body.offset + body.k]
    return json_response({"results": _hits(page, current, index, body.return_vectors),
                          "index_version": current.version})


async def _answer(state: ServiceState, body: Searching, current: IndexSet, index: LoadedIndex, job: SearchJob,
                  search: Callable[[], Awaitable[list[Hit]]], query: Callable[[], Awaitable[np.ndarray]],
                  leave_out: int | None = None) -> Response:
    """The page of hits: as the search ranks them, or with `dedup`, distinct ones from a search
    by the query's vector (each with the ids folded into it)."""
    if not body.dedup:
        return _search_response(await search(), body, current, index)
    found = await state.engine.search_distinct(job, await query(), body.dedup_threshold, leave_out)
    page = found[body.offset : body.offset + body.k]
    return json_response({"results": _hits([h for h, _ in page], current, index, body.return_vectors,
                                           [f for _, f in page]),
                          "index_version": current.version})


# The index is taken before encoding: a missing one answers 503 at once, and a hot reload
# meanwhile does not matter.
@router.post("/search/text", response_model=SearchResponse, responses=_ERRORS,
             openapi_extra=body_schema(TextSearchRequest))
async def search_text(request: Request) -> Response:
    """Text -> images: the query text's vector searched in the image index (or, with
    `target: text`, in the text index)."""
    state = service_state(request)
    body = await read_body(request, TextSearchRequest, state.settings)
    current, index = state.index_for(body.target)
    job = await _job(body, state, index)
    engine, gone = state.engine, client_gone(request)
    if body.mode != "vector":
        if body.dedup:
            raise InvalidInput(f"dedup: folds near-duplicates by their vectors, with mode vector; not with "
                               f"mode {body.mode}", field="dedup")
        hits = await engine.search_words(job, body.text, body.mode, body.lexical_weight, disconnected=gone)
        return _search_response(hits, body, current, index)
    return await _answer(state, body, current, index, job,
                         lambda: engine.search_text(job, body.text, disconnected=gone),
                         lambda: engine.embed_texts([body.text], field="text", disconnected=gone))


@router.post("/search/image", response_model=SearchResponse, responses=_ERRORS,
             openapi_extra=body_schema(ImageSearchRequest, form=True))
async def search_image(request: Request) -> Response:
    """Image -> texts: the query image's vector searched in the text index (or, with
    `target: image`, in the image index)."""
    state = service_state(request)
    body = await read_body(request, ImageSearchRequest, state.settings)
    current, index = state.index_for(body.target)
    job = await _job(body, state, index)
    engine, gone = state.engine, client_gone(request)
    return await _answer(state, body, current, index, job,
                         lambda: engine.search_image(job, body.image, disconnected=gone),
                         lambda: engine.embed_images([body.image], field="image", disconnected=gone))


@router.post("/search/similar", response_model=SearchResponse, responses={**_ERRORS, 404: {"model": ErrorResponse}},
             openapi_extra=body_schema(SimilarSearchRequest))
async def search_similar(request: Request) -> Response:
    """More like this: a stored item's own vector searched in its index (no model call); the
    item itself is left out."""
    state = service_state(request)
    body = await read_body(request, SimilarSearchRequest, state.settings)
    current, index = state.index_for(body.modality)
    job = await _job(body, state, index)
    row = index.row_of(body.id)
    if row is None:
        raise NotFound(f"id: no item {body.id!r} in the {body.modality} index (version {current.version})",
                       field="id")
    engine = state.engine
    return await _answer(state, body, current, index, job, lambda: engine.search_similar(job, row),
                         lambda: _ready(index.vector(row)), leave_out=row)


@router.post("/search/vector", response_model=SearchResponse, responses=_ERRORS,
             openapi_extra=body_schema(VectorSearchRequest))
async def search_vector(request: Request) -> Response:
    """A given vector searched in the image (or text) index; it is L2-normalized first."""
    state = service_state(request)
    body = await read_body(request, VectorSearchRequest, state.settings)
    current, index = state.index_for(body.target)
    vector = state.engine.unit_vector(body.vector, "vector")
    job = await _job(body, state, index)
    engine = state.engine
    return await _answer(state, body, current, index, job, lambda: engine.search_vector(job, vector),
                         lambda: _ready(vector))


@router.post("/classify", response_model=ClassifyResponse, responses=_ERRORS,
             openapi_extra=body_schema(ClassifyRequest, form=True))
async def classify(request: Request) -> Response:
    """Zero-shot classification: labels sorted by softmax(logit_scale x cosine) of image and prompts
    (for a SigLIP model, each label's own sigmoid(logit_scale x cosine + logit_bias))."""
    state = service_state(request)
    body = await read_body(request, ClassifyRequest, state.settings)
    disconnected = client_gone(request)
    engine = state.engine
    engine.check_count(len(body.labels) + 1)
    texts = zeroshot.prompts(body.labels, body.template)
    engine.check_texts(texts, field="labels")
    image, labels = await gather_or_cancel(
        engine.embed_images([body.image], field="image", disconnected=disconnected),
        engine.embed_texts(texts, field="labels", disconnected=disconnected),
    )
    model = state.model
    return json_response({"labels": zeroshot.classify(image[0], labels, body.labels, model.logit_scale,
                                                      model.logit_bias)})


@router.post("/similarity", response_model=SimilarityResponse, responses=_ERRORS,
             openapi_extra=body_schema(SimilarityRequest, form=True))
async def similarity(request: Request) -> Response:
    """Cosine matrix (images x texts) and per-image softmax probabilities over the texts (per-pair
    sigmoids for a SigLIP model; `logit_bias` is then set)."""
    state = service_state(request)
    body = await read_body(request, SimilarityRequest, state.settings)
    disconnected = client_gone(request)
    engine = state.engine
    engine.check_count(len(body.texts) + len(body.images))
    engine.check_texts(body.texts)
    images, texts = await gather_or_cancel(
        engine.embed_images(body.images, disconnected=disconnected),
        engine.embed_texts(body.texts, disconnected=disconnected),
    )
    model = state.model
    cos, probs = zeroshot.similarity(images, texts, model.logit_scale, model.logit_bias)
    return json_response({"cosine": cos, "probabilities": probs, "logit_scale": model.logit_scale,
                          "logit_bias": model.logit_bias})


@router.post("/admin/reload", responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
                                         409: {"model": ErrorResponse}})
async def admin_reload(state: State, _: AdminAuth) -> Response:
    """Load the index version `CURRENT` names now (also retries a refused one); 409 if refused."""
    before = state.indexes.current
    loaded = await run_in_threadpool(lambda: state.load_index(fatal=False, force=True))
    return json_response({
        "index_version": loaded.version if loaded else None,
        "previous_version": before.version if before else None,
        "reloaded": loaded is not before,
    })


@router.get("/healthz")
async def healthz() -> Response:
    """Liveness: 200 while the process serves HTTP."""
    return json_response({"status": "ok"})


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(state: State) -> Response:
    """Readiness: 200 when the model and the configured indexes are loaded, else 503 with the reason."""
    reason = state.not_ready_reason()
    current = state.indexes.current
    body = {
        "ready": reason is None,
        "reason": reason,
        "model": state.model.info.spec if state.settings.expose_internals else state.settings.public_model_name,
        "index_version": current.version if current else None,
    }
    return json_response(body, status_code=200 if reason is None else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
async def metrics(state: State) -> Response:
    """Prometheus metrics."""
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/")
async def info(state: State, request: Request) -> Response:
    """What is served: model, dimension, device, index version and sizes, and how this
    worker runs it (CUDA graphs fall back to eager with only a log line: this says which).
    A browser (which asks for HTML first) is sent to the search page instead."""
    if request.headers.get("accept", "").startswith("text/html"):
        return RedirectResponse("/ui", status_code=307)
    current = state.indexes.current
    settings = state.settings
    if not settings.expose_internals:  # what a client needs, without paths, pids or the runtime
        return json_response({
            "service": "clipsearch", "model": state.model.info.spec, "family": state.model.info.family,
            "dim": state.model.dim,
            "index": None if current is None else {
                "version": current.version, "counts": {m: i.count for m, i in current.indexes.items()}},
        })
    return json_response({
        "service": "clipsearch",
        "model": state.model.info.__dict__,
        "runtime": {
            "cuda_graphs": state.model.graphed_towers,
            "max_batch_size": settings.max_batch_size,
            "image_decode": settings.image_decode,
            "jpegs_per_batch": state.engine.decoder.jpegs_per_batch,
            "exif_orientation": settings.exif_orientation,
            "workers": settings.workers,
            "pid": os.getpid(),
        },
        "search_backend": state.backend,
        "index": None if current is None else {
            "version": current.version,
            "path": str(current.path),
            "counts": {m: i.count for m, i in current.indexes.items()},
        },
    })
