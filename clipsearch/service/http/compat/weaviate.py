"""Weaviate's multi2vec-clip inference API (weaviate/multi2vec-clip-inference: app.py, clip.py,
smoke_test.py), so that Weaviate's module uses clipsearch as its inference container
(`CLIP_INFERENCE_API=http://clipsearch:8000`):

- `POST /vectorize` `{"texts": [...], "images": [base64, ...]}` -> `{"textVectors", "imageVectors"}`,
- `GET /meta`: what is served,
- `GET /.well-known/live` and `/.well-known/ready`: 204 (ready: 503 while loading).

Errors are `{"error": "<message>"}`, as Weaviate's client reads them. Texts are cut to the
model's context, as the module's own container truncates them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from clipsearch.service.http.bodies import body_schema, read_body
from clipsearch.service.http.deps import State, client_gone, service_state
from clipsearch.service.http.routes import json_response
from clipsearch.service.http.schemas import Image, MessageError

router = APIRouter(tags=["Weaviate multi2vec-clip API"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": MessageError} for code in (400, 401, 408, 413, 422, 429, 503, 504)}


class VectorizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    texts: list[str] = Field([], description="texts to embed (cut to the model's context)")
    images: list[Image] = Field([], description="images: base64 (as Weaviate sends blobs), data: URIs")


class VectorizeResponse(BaseModel):
    textVectors: list[list[float]]
    imageVectors: list[list[float]]


@router.post("/vectorize", response_model=VectorizeResponse, responses=ERRORS,
             openapi_extra=body_schema(VectorizeRequest))
async def vectorize(request: Request) -> Response:
    """L2-normalized vectors of the texts and of the images, each in input order."""
    state, disconnected = service_state(request), client_gone(request)
    body = await read_body(request, VectorizeRequest, state.settings)
    engine = state.engine
    if body.texts or body.images:  # both empty: two empty lists, as the module's container answers
        engine.check_count(len(body.texts) + len(body.images))
    texts = [state.model.context_text(t) for t in body.texts]
    texts_out, images_out = await engine.embed_both(texts, body.images, disconnected=disconnected, checked=True)
    return json_response({"textVectors": texts_out, "imageVectors": images_out})


@router.get("/meta", responses=ERRORS)
async def meta(state: State) -> Response:
    """The served model, as the module's /meta shows its model's configuration."""
    info = state.model.info
    public = state.settings.expose_internals
    return json_response({
        "model": info.spec if public else state.settings.public_model_name, "family": info.family,
        "dim": info.dim, "context_length": info.context_length, "image_size": list(info.image_size),
        "service": "clipsearch"})


@router.get("/.well-known/live", status_code=204, response_class=Response)
async def live() -> Response:
    """Liveness, as Weaviate probes its inference container: 204."""
    return Response(status_code=204)


@router.get("/.well-known/ready", status_code=204, response_class=Response, responses={503: {"model": MessageError}})
async def ready(request: Request) -> Response:
    """Readiness: 204 once the model is loaded (an index is not needed to vectorize), else 503."""
    svc = getattr(request.app.state, "service", None)
    if svc is None or not svc.started:
        return json_response({"error": "model is loading"}, status_code=503)
    return Response(status_code=204)
