"""clip-retrieval's back end (clip_retrieval/clip_back.py: `KnnService`, `MetadataService`,
`IndicesList`), so that its `ClipClient` and its web front (clip-front) search a clipsearch
index: `POST /knn-service`, `POST /metadata`, `GET /indices-list`.

clipsearch serves one index set, listed under `INDEX_NAME`; a request naming another
`indice_name` is answered from it too. Ids are integers, as clip-retrieval's: an image row's
id is its row, a text row's is the image index's size plus its row, so `/metadata` resolves
either. A hit carries `id`, `similarity`, `caption` (the item's text), `url` (its metadata's
`url`, else its thumbnail's address) and the item's other metadata.

What clip-retrieval does that clipsearch does not: `use_safety_model` and
`use_violence_detector` are accepted and ignored (clip_back loads neither model unless told
to); `aesthetic_score` / `aesthetic_weight` likewise (LAION's aesthetic embeddings exist
for two OpenAI models only); `use_mclip: true` is a 400 (clip_back would answer with another
model). `deduplicate` collapses near-duplicate hits as clip_back does. `num_result_ids` is
capped at `max_k`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat
from starlette.requests import Request
from starlette.responses import Response

from clipsearch.core.errors import InvalidInput, NotFound
from clipsearch.index.dedup import keep_first
from clipsearch.index.format import Modality
from clipsearch.index.search import Hit, IndexSet, LoadedIndex, SearchParams
from clipsearch.service.engine import SearchJob
from clipsearch.service.http.bodies import body_schema, read_body
from clipsearch.service.http.deps import State, client_gone, service_state
from clipsearch.service.http.routes import json_response, thumbnail_url
from clipsearch.service.http.schemas import Count, Image, Integer, MessageError, NonNegative
from clipsearch.service.state import ServiceState

router = APIRouter(tags=["clip-retrieval API"])

INDEX_NAME = "clipsearch"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": MessageError} for code in (400, 401, 404, 408, 413, 422, 429, 503, 504)}
Blank = Literal[""]  # what clip-front sends for "not set"


class KnnRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str | None = Field(None, description="a query text")
    image: Image | None = Field(None, description="a query image, base64")
    image_url: str | None = Field(None, description="a query image's URL (hosts allowed by CLIPSEARCH_IMAGE_URLS)")
    embedding_input: list[StrictFloat] | None = Field(None, description="a query vector")
    modality: Literal["image", "text"] = Field("image", description="search the image index or the text index")
    num_images: Count = Field(40, description="hits returned with their metadata")
    num_result_ids: Count | None = Field(None, description="hits returned in all [num_images; at most max_k]")
    indice_name: str | None = Field(None, description="accepted; the one index set served answers")
    deduplicate: StrictBool = Field(False, description="fold near-duplicate hits (cosine >= 0.94) into the best-ranked")
    use_mclip: StrictBool = Field(False, description="true is refused: one model is served")
    use_safety_model: StrictBool = Field(False, description="accepted and ignored (no safety model)")
    use_violence_detector: StrictBool = Field(False, description="accepted and ignored (no violence detector)")
    aesthetic_score: Integer | Blank | None = Field(None, description="accepted and ignored")
    aesthetic_weight: StrictFloat | str | None = Field(None, description="accepted and ignored")


@router.get("/indices-list", responses=ERRORS)
async def indices_list() -> Response:
    """The index names, as clip-retrieval lists them: the one index set served."""
    return json_response([INDEX_NAME])


def _first_id(current: IndexSet, modality: Modality) -> int:
    """Where a modality's ids start: image rows first, then text rows."""
    image = current.get("image")
    return 0 if modality == "image" or image is None else image.count


def _hit_row(hit: Hit, base: int, similarity: float, metadata: bool, current: IndexSet, index: LoadedIndex,
             root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if metadata:
        out.update(_metadata(hit.row, current, index, root, hit))
    out["id"] = base + hit.row
    out["similarity"] = similarity
    return out


def _metadata(row: int, current: IndexSet, index: LoadedIndex, root: str, hit: Hit | None = None) -> dict[str, Any]:
    if hit is None:
        item = index.items.get(row)
        meta, text = item.get("metadata") or {}, item.get("text")
    else:
        meta, text = hit.metadata, hit.text
    out = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None}
    if text is not None:
        out["caption"] = text
    if "url" not in out and index.has_thumbnail(row):
        out["url"] = root + thumbnail_url(current.version, row)
    return out


async def _query_hits(body: KnnRequest, state: ServiceState, job: SearchJob, request: Request) -> list[Hit]:
    engine = state.engine
    if body.text:
        return await engine.search_text(job, body.text, disconnected=client_gone(request))
    if body.image is not None or body.image_url is not None:
        image = body.image if body.image is not None else body.image_url
        field = "image" if body.image is not None else "image_url"
        return await engine.search_image(job, image, field=field, disconnected=client_gone(request))  # type: ignore[arg-type]
    if body.embedding_input is not None:
        return await engine.search_vector(job, engine.unit_vector(body.embedding_input, "embedding_input"))
    raise InvalidInput("text: give one of text, image, image_url and embedding_input", field="text")


@router.post("/knn-service", responses=ERRORS, openapi_extra=body_schema(KnnRequest))
async def knn_service(request: Request) -> Response:
    """The nearest items to a text, an image or a vector, in clip-retrieval's answer shape."""
    state = service_state(request)
    body = await read_body(request, KnnRequest, state.settings)
    if body.use_mclip:
        raise InvalidInput(f"use_mclip: this server serves one model ({state.settings.public_model_name}); leave "
                           "use_mclip off (serve a multilingual model to search in other languages)", field="use_mclip")
    current, index = state.index_for(body.modality)
    wanted = min(body.num_result_ids or body.num_images, state.settings.max_k)
    job = SearchJob(index, min(wanted, index.count), SearchParams())
    hits = await _query_hits(body, state, job, request)
    if body.deduplicate and len(hits) > 1:
        kept = keep_first(index.vectors_of(np.asarray([h.row for h in hits], np.int64)))
        hits = [hits[i] for i in kept]
    base, root = _first_id(current, body.modality), str(request.base_url).rstrip("/")
    return json_response([_hit_row(h, base, h.score, i < body.num_images, current, index, root)
                          for i, h in enumerate(hits)])


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: Annotated[list[NonNegative], Field(max_length=1000)] = Field(
        description="ids from /knn-service")
    indice_name: str | None = Field(None, description="accepted; the one index set served answers")


@router.post("/metadata", responses=ERRORS, openapi_extra=body_schema(MetadataRequest))
async def metadata(request: Request, state: State) -> Response:
    """Each id's metadata (caption, url, ...), as clip-front fetches it for hits past the first page."""
    body = await read_body(request, MetadataRequest, state.settings)
    if not body.ids:
        return json_response([])
    current = state.current_index()
    root = str(request.base_url).rstrip("/")
    out = []
    for i, item_id in enumerate(body.ids):
        found = _locate(current, item_id)
        if found is None:
            raise NotFound(f"ids[{i}]: no item {item_id} in index version {current.version}", field=f"ids[{i}]")
        index, row = found
        out.append({"id": item_id, "metadata": _metadata(row, current, index, root)})
    return json_response(out)


def _locate(current: IndexSet, item_id: int) -> tuple[LoadedIndex, int] | None:
    modalities: tuple[Modality, ...] = ("image", "text")
    for modality in modalities:
        index = current.get(modality)
        if index is None:
            continue
        row = item_id - _first_id(current, modality)
        if 0 <= row < index.count:
            return index, row
    return None
