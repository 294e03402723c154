"""immich's machine-learning API (immich: machine-learning/immich_ml/main.py, schemas.py,
models/clip/{textual,visual}.py), for its smart search: immich's server, with its machine
learning URL set to clipsearch, gets CLIP vectors from the served model.

- `POST /predict`, a form: `entries` (JSON: `{"clip": {"textual" | "visual": {"modelName": ...,
  "options": {...}}}}`) and `text` (textual) or an `image` file (visual). The answer holds the
  vector serialized as a JSON string, as immich's models answer: `{"clip": "[0.1, ...]"}`, and
  for an image its `imageHeight` and `imageWidth`.
- `GET /ping`: "pong".

Only CLIP is served: other tasks (facial recognition, OCR, ...) are a 400. The model name must
be the served name, an open_clip model's immich name (`ViT-B-32__openai`), or one listed in
`CLIPSEARCH_IMMICH_MODEL_NAMES`. Errors are FastAPI's `{"detail": "<message>"}`, as immich's.
"""

from __future__ import annotations

import io
from typing import Any

import orjson
from fastapi import APIRouter
from PIL import Image as PILImage
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from clipsearch.core.errors import InvalidInput
from clipsearch.images.codec import image_input_bytes
from clipsearch.service.http.bodies import body_schema, read_body
from clipsearch.service.http.deps import client_gone, service_state
from clipsearch.service.http.routes import json_response
from clipsearch.service.http.schemas import DetailError, Image
from clipsearch.service.state import ServiceState

router = APIRouter(tags=["immich machine-learning API"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": DetailError} for code in (400, 401, 408, 413, 422, 429, 503, 504)}


class PredictForm(BaseModel):
    model_config = ConfigDict(extra="ignore")

    entries: str = Field(description='JSON: {"clip": {"textual" or "visual": {"modelName": "...", "options": {}}}}')
    text: str | None = Field(None, description="the text (textual)")
    image: Image | None = Field(None, description="the image file (visual)")


def accepted_names(state: ServiceState) -> set[str]:
    """The model names /predict answers for."""
    settings = state.settings
    names = {settings.served_name, *settings.immich_model_names}
    info = state.model.info
    if info.family == "open_clip" and info.pretrained:
        names.add(f"{settings.model}__{info.pretrained}")  # immich names open_clip models so
    return names


def _tower(entries: str, state: ServiceState) -> str:
    """`textual` or `visual`, from immich's `entries`, or the 400 that says what is wrong."""
    try:
        request = orjson.loads(entries)
    except orjson.JSONDecodeError:
        raise InvalidInput("entries: not JSON", field="entries") from None
    if not isinstance(request, dict) or not request:
        raise InvalidInput('entries: expected {"clip": {"textual" or "visual": {"modelName": ...}}}', field="entries")
    others = sorted(task for task in request if task != "clip")
    if others:
        raise InvalidInput(f"entries: only the clip task is served here, not {', '.join(map(str, others))}: send "
                           "those to immich's own machine-learning service", field="entries")
    types = request["clip"]
    if not isinstance(types, dict) or len(types) != 1 or next(iter(types)) not in ("textual", "visual"):
        raise InvalidInput('entries.clip: expected one of {"textual": {...}} and {"visual": {...}}',
                           field="entries.clip")
    tower, entry = next(iter(types.items()))
    name = entry.get("modelName") if isinstance(entry, dict) else None
    if not isinstance(name, str):
        raise InvalidInput(f"entries.clip.{tower}.modelName: missing", field=f"entries.clip.{tower}.modelName")
    if name not in accepted_names(state):
        raise InvalidInput(
            f"entries.clip.{tower}.modelName: {name!r} is not served here; this server serves "
            f"{state.settings.served_name!r}: set immich's CLIP model to it, or list {name!r} in "
            "CLIPSEARCH_IMMICH_MODEL_NAMES to answer it with the served model", field=f"entries.clip.{tower}.modelName")
    return str(tower)


def _size(data: bytes) -> tuple[int, int]:
    with PILImage.open(io.BytesIO(data)) as image:
        return image.size


@router.post("/predict", responses=ERRORS, openapi_extra=body_schema(PredictForm, form=True))
async def predict(request: Request) -> Response:
    """A CLIP vector of a text or an image, in immich's answer shape."""
    state, disconnected = service_state(request), client_gone(request)
    body = await read_body(request, PredictForm, state.settings)
    tower = _tower(body.entries, state)
    engine = state.engine
    if tower == "textual":
        if body.text is None:
            raise InvalidInput("text: the textual model needs a text", field="text")
        vectors = await engine.embed_texts([state.model.context_text(body.text)], field="text",
                                           disconnected=disconnected, checked=True)
        return json_response({"clip": _serialized(vectors[0])})
    if body.image is None:
        raise InvalidInput("image: the visual model needs an image file", field="image")
    vectors = await engine.embed_images([body.image], field="image", disconnected=disconnected)
    raw = image_input_bytes(body.image, field="image", max_bytes=state.settings.max_image_bytes)
    width, height = await run_in_threadpool(_size, raw)
    return json_response({"clip": _serialized(vectors[0]), "imageHeight": height, "imageWidth": width})


def _serialized(vector: Any) -> str:
    """The vector as immich's models give it: a JSON array in a string."""
    return orjson.dumps(vector, option=orjson.OPT_SERIALIZE_NUMPY).decode()


@router.get("/ping", response_class=PlainTextResponse)
async def ping() -> PlainTextResponse:
    """immich's health check: "pong"."""
    return PlainTextResponse("pong")
