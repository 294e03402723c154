"""OpenAI's embeddings API: `POST /v1/embeddings` and `GET /v1/models`, so that the OpenAI SDK,
LangChain, LlamaIndex, litellm and other OpenAI clients work at their defaults. Same engine,
same batcher and same vectors as `/embed`.

Where OpenAI's API and clipsearch's native one differ, this route does what OpenAI clients
expect: up to `openai_max_inputs` (2,048) inputs per call, run `max_items_per_request` at a
time; a long text is cut to the model's context instead of refused; inputs may be token-id
arrays (the model's own tokenizer's). Images come as infinity takes them (`modality: "image"`,
items as base64 or data: URIs). Errors come in OpenAI's shape (clipsearch.service.http.errors).
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Annotated, Any, Literal, cast

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from clipsearch.core.errors import InvalidInput, NotFound
from clipsearch.service.http.bodies import body_schema, read_body
from clipsearch.service.http.deps import State, client_gone, service_state
from clipsearch.service.http.routes import json_response
from clipsearch.service.http.schemas import OpenAIError, Positive, TokenId
from clipsearch.service.state import ServiceState

router = APIRouter(prefix="/v1", tags=["OpenAI API"])

OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIError} for code in (400, 401, 404, 408, 413, 422, 429, 503, 504)}

TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1)] = Field(
            description="a text, a list of texts, or token ids (one array, or a list of arrays) of the model's own "
            "tokenizer; with modality image, base64 images or data: URIs. Up to openai_max_inputs items; a text "
            "longer than the model's context is cut to it")
    model: str = Field(description="the served model's name (GET /v1/models)")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32")
    dimensions: Positive | None = Field(None, description="only the model's own dimension: vectors are not cut")
    user: str | None = Field(None, description="accepted and ignored")
    modality: Literal["text", "image"] = Field("text", description="what `input` holds (an extension, as infinity's)")


class InfinityEmbeddingsRequest(EmbeddingsRequest):
    """infinity's /embeddings: OpenAI's fields; litellm's `infinity/` provider sends `dimensions`
    as `output_dimension`."""

    output_dimension: Positive | None = Field(None, description="infinity's name for `dimensions`")


def _inputs(body: EmbeddingsRequest) -> tuple[list[str] | list[list[int]], bool]:
    """The items, and whether they are token-id arrays."""
    value = body.input
    if isinstance(value, str):
        return [value], False
    if value and isinstance(value[0], int):
        return [value], True
    return value, bool(value) and isinstance(value[0], list)  # type: ignore[return-value]


def _texts_of_ids(arrays: list[list[int]], state: ServiceState) -> list[str]:
    model, name = state.model, state.settings.served_name
    texts = []
    for i, ids in enumerate(arrays):
        text = model.text_of_ids(ids)
        if text is None:
            raise InvalidInput(
                f"input[{i}]: these token ids are not {name}'s tokenizer's, so they cannot be read back as text (a "
                "client that counts tokens with tiktoken sends such ids): send the texts themselves; with "
                "LangChain, OpenAIEmbeddings(..., check_embedding_ctx_length=False)", field=f"input[{i}]")
        texts.append(text)
    return texts


async def embed_openai_style(request: Request, model: type[EmbeddingsRequest]) -> tuple[dict[str, Any], str]:
    """The body of an OpenAI-style embeddings answer, and its encoding format."""
    state, disconnected = service_state(request), client_gone(request)
    body = await read_body(request, model, state.settings)
    engine, name, settings = state.engine, state.settings.served_name, state.settings
    if body.model != name:
        raise NotFound(f"model {body.model!r} is not served here; this server serves {name!r}", field="model")
    dimensions = body.dimensions or getattr(body, "output_dimension", None)
    if dimensions is not None and dimensions != engine.dim:
        field = "dimensions" if body.dimensions is not None else "output_dimension"
        raise InvalidInput(f"{field}: {dimensions} is not offered; {name} gives {engine.dim}-dimensional vectors "
                           "(leave it out)", field=field)
    items, ids = _inputs(body)
    engine.check_count(len(items), settings.openai_max_inputs, field="input")
    if body.modality == "image":
        if ids:
            raise InvalidInput("input: token ids are text; with modality image, send images", field="input")
        vectors = await engine.embed_many(items, "image", field="input", disconnected=disconnected)
        tokens = 0
    else:
        given = await run_in_threadpool(_texts_of_ids, items, state) if ids else cast(list[str], items)  # type: ignore[arg-type]
        texts = [state.model.context_text(t) for t in given]
        vectors = await engine.embed_many(texts, "text", field="input", disconnected=disconnected, checked=True)
        tokens = await run_in_threadpool(state.model.count_tokens, texts)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    return ({"object": "list", "data": data, "model": name,
             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, body.encoding_format)


@router.post("/embeddings", responses=OPENAI_ERRORS, openapi_extra=body_schema(EmbeddingsRequest))
async def embeddings(request: Request) -> Response:
    """Embeddings in the OpenAI API's shape, with real token counts for texts."""
    answer, _ = await embed_openai_style(request, EmbeddingsRequest)
    return json_response(answer)


def infinity_answer(answer: dict[str, Any]) -> dict[str, Any]:
    """What infinity adds to OpenAI's answer."""
    return {**answer, "id": f"infinity-{uuid.uuid4()}", "created": int(time.time())}


def _encode(vector: np.ndarray, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()
    return vector  # orjson writes float32 rows as they are


@router.get("/models", responses=OPENAI_ERRORS)
async def models(state: State) -> Response:
    """The one served model, as OpenAI lists models."""
    return json_response({"object": "list", "data": [
        {"id": state.settings.served_name, "object": "model", "created": 0, "owned_by": "clipsearch"}]})
