"""OpenAI-compatible embeddings: `POST /v1/embeddings` and `GET /v1/models`, so that the OpenAI
SDK, LiteLLM and other OpenAI clients work as they are. Same engine, same batcher and same
vectors as `/embed`; images go through the same route as infinity takes them (`modality:
"image"`, items as base64 or data: URIs). Errors come in OpenAI's shape (clipsearch.service.http.errors).
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from clipsearch.core.errors import InvalidInput, NotFound
from clipsearch.service.http.bodies import body_schema, read_body
from clipsearch.service.http.deps import State, client_gone, service_state
from clipsearch.service.http.routes import _ERRORS, json_response

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


_OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": OpenAIError} for code in (*_ERRORS, 404)}


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)] = Field(
        description="a text or a list of texts; with modality image, base64 images or data: URIs")
    model: str = Field(description="the served model's name (GET /v1/models)")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32")
    dimensions: int | None = Field(None, ge=1, description="must be the model's own dimension if given")
    user: str | None = Field(None, description="accepted and ignored")
    modality: Literal["text", "image"] = Field("text", description="what `input` holds (an extension, as infinity's)")


def served_name(state: Any) -> str:
    return state.settings.served_name


@router.post("/embeddings", responses=_OPENAI_ERRORS, openapi_extra=body_schema(EmbeddingsRequest))
async def embeddings(request: Request) -> Response:
    """Embeddings in the OpenAI API's shape, with real token counts for texts."""
    state, disconnected = service_state(request), client_gone(request)
    body = await read_body(request, EmbeddingsRequest, state.settings)
    engine, name = state.engine, served_name(state)
    if body.model != name:
        raise NotFound(f"model {body.model!r} is not served here; this server serves {name!r}", field="model")
    if body.dimensions is not None and body.dimensions != engine.dim:
        raise InvalidInput(f"dimensions: {body.dimensions} is not supported; {name} gives {engine.dim}",
                           field="dimensions")
    items = [body.input] if isinstance(body.input, str) else body.input
    engine.check_count(len(items))
    if body.modality == "image":
        vectors = await engine.embed_images(items, field="input", disconnected=disconnected)
        tokens = 0
    else:
        vectors = await engine.embed_texts(items, field="input", disconnected=disconnected)
        tokens = state.model.count_tokens(items)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    return json_response({"object": "list", "data": data, "model": name,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _encode(vector: np.ndarray, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()
    return vector.tolist()


@router.get("/models")
async def models(state: State) -> Response:
    """The one served model, as OpenAI lists models."""
    return json_response({"object": "list", "data": [
        {"id": served_name(state), "object": "model", "created": 0, "owned_by": "clipsearch"}]})
