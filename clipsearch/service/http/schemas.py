"""Request and response bodies of the HTTP API (the contract in the README)."""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictFloat,
    WithJsonSchema,
)


def _integer(value: Any) -> Any:
    """JSON integers only (10 or 10.0): no `true` or `"5"` coerced into one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be an integer")
    return value


def _number(value: Any) -> Any:
    """JSON numbers only (0.5 or 1): no `true` or `"0.5"` coerced into one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    return value


Integer = Annotated[int, BeforeValidator(_integer)]
Number = Annotated[float, BeforeValidator(_number)]
# JSON integers with bounds the OpenAPI document states (the bound before the validator)
Positive = Annotated[int, Field(ge=1), BeforeValidator(_integer)]
NonNegative = Annotated[int, Field(ge=0), BeforeValidator(_integer)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1), BeforeValidator(_integer)]
Count = Annotated[int, Field(ge=1, le=1_000_000), BeforeValidator(_integer)]
Probes = Annotated[int, Field(ge=1, le=65536), BeforeValidator(_integer)]
def _image(value: Any) -> Any:
    """A base64 string, a data: URI or an image URL (JSON), or an uploaded file's bytes (multipart)."""
    if isinstance(value, bytes) or (isinstance(value, str) and value):  # an empty file is an invalid image: 400
        return value
    raise ValueError("must be a non-empty string: base64, a data: URI or an image URL")


IMAGE_DESCRIPTION = "an image: base64 (standard or urlsafe), a data: URI, or an http(s) URL where the server allows"
Image = Annotated[str | bytes, PlainValidator(_image),
                  WithJsonSchema({"type": "string", "minLength": 1, "description": IMAGE_DESCRIPTION})]


class _Request(BaseModel):
    # Unknown fields are an error: a typo ("text" for "texts") must not pass silently.
    model_config = ConfigDict(extra="forbid")


class EmbedRequest(_Request):
    texts: list[str] = Field(default_factory=list, description="texts to embed")
    images: list[Image] = Field(default_factory=list, description="images to embed")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    texts: list[list[float]]
    images: list[list[float]]


class _SearchRequest(_Request):
    k: Integer = Field(10, ge=1, description="number of results (offset + k at most the max_k setting)")
    offset: Integer = Field(0, ge=0, description="results to skip: pages of one index version are stable")
    filter: dict[str, Any] | None = Field(
        None, description='metadata filter: {"colour": "red", "year": {"$gte": 2000}}, with $eq $ne $in $nin $gt '
        "$gte $lt $lte $exists $and $or (docs/api.md)")
    return_vectors: StrictBool = Field(False, description="include each hit's stored vector")
    dedup: StrictBool = Field(False, description="fold near-duplicate hits into the best-ranked of them and refill "
                              "the page with distinct ones; each hit lists the ids folded into it")
    dedup_threshold: Number = Field(0.94, gt=0.0, le=1.0, description="with dedup: the cosine at which a hit folds "
                                    "into a better-ranked one")
    nprobe: Probes | None = Field(None, description="IVF lists to visit (default: the manifest's)")
    ef_search: Probes | None = Field(None, description="HNSW efSearch (default: the manifest's)")


class TextSearchRequest(_SearchRequest):
    text: str = Field(min_length=1, description="query text")
    target: Literal["image", "text"] = Field("image", description="the index searched: images, or texts")
    mode: Literal["vector", "lexical", "hybrid"] = Field(
        "vector", description="vector: by the text's vector; lexical: by the items' texts holding its words (BM25); "
        "hybrid: both, fused by reciprocal rank")
    lexical_weight: Number = Field(1.0, ge=0.0, le=100.0, description="hybrid: the BM25 ranking's weight in the "
                                   "fusion (the vector ranking's is 1)")


class ImageSearchRequest(_SearchRequest):
    image: Image = Field(description="query image")
    target: Literal["text", "image"] = Field("text", description="the index searched: texts, or images")


class SimilarSearchRequest(_SearchRequest):
    id: str = Field(min_length=1, description="a stored item's id: its own vector is the query")
    modality: Literal["image", "text"] = Field("image", description="the index that holds the item, and is searched")


class VectorSearchRequest(_SearchRequest):
    vector: list[StrictFloat] = Field(
        min_length=1, description="a query vector of the model's dimension (L2-normalized here: cosine ranks)")
    target: Literal["image", "text"] = Field("image", description="the index searched")


class SearchHit(BaseModel):
    id: str
    score: float
    metadata: dict[str, Any] = Field(default_factory=dict)
    text: str | None = None
    thumbnail: str | None = Field(None, description="URL of the item's thumbnail (image index, when built)")
    vector: list[float] | None = Field(None, description="the stored vector, with return_vectors")
    duplicates: list[str] | None = Field(None, description="with dedup: ids of the hits folded into this one")


class SearchResponse(BaseModel):
    results: list[SearchHit]
    index_version: str


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """Errors of the OpenAI and infinity routes."""

    error: OpenAIErrorDetail


class MessageError(BaseModel):
    """Errors of the Weaviate and clip-retrieval routes."""

    error: str


class DetailError(BaseModel):
    """Errors of the immich routes (FastAPI's own shape)."""

    detail: str


class ClassifyRequest(_Request):
    image: Image = Field(description="image to classify")
    labels: list[str] = Field(min_length=1, description="candidate labels")
    template: str = Field("a photo of a {}", description="prompt template; {} is replaced by each label")


class LabelScore(BaseModel):
    label: str
    probability: float
    score: float


class ClassifyResponse(BaseModel):
    labels: list[LabelScore]


class SimilarityRequest(_Request):
    texts: list[str] = Field(min_length=1)
    images: list[Image] = Field(min_length=1)


class SimilarityResponse(BaseModel):
    cosine: list[list[float]] = Field(description="images x texts cosine similarities")
    probabilities: list[list[float]] = Field(description="per image, softmax over texts of logit_scale x cosine; "
                                             "for SigLIP, each pair's sigmoid(logit_scale x cosine + logit_bias)")
    logit_scale: float
    logit_bias: float | None = Field(None, description="set for SigLIP models (sigmoid probabilities)")


def apply_limits(document: dict[str, Any], settings: Any) -> None:
    """Write the settings' limits into an OpenAPI document, so that it describes what the
    service accepts: most items, longest text, largest image, largest k. The routes of other
    services' APIs get theirs (they cut long texts instead of refusing them)."""
    from clipsearch.service.http.errors import shape_for

    for path, operations in document.get("paths", {}).items():
        limit = _limit if shape_for(path) == "native" else _limit_compat
        _walk(operations, functools.partial(limit, settings=settings))


def _walk(node: Any, visit: Any) -> None:
    """`visit` every object of a JSON document, depth first."""
    if isinstance(node, list):
        for child in node:
            _walk(child, visit)
    elif isinstance(node, dict):
        visit(node)
        for child in node.values():
            _walk(child, visit)


def _image_chars(settings: Any) -> int:
    return (settings.max_image_bytes + 2) // 3 * 4 + 256  # base64, padding and a data: URI prefix


def _limit(node: dict[str, Any], settings: Any) -> None:
    image_chars = _image_chars(settings)
    for name, prop in (node.get("properties") or {}).items():
        if name == "k":
            prop["maximum"] = settings.max_k
        elif name in ("texts", "images", "labels"):
            prop["maxItems"] = settings.max_items_per_request - (name == "labels")  # a label's image counts too
            prop.setdefault("items", {})["maxLength"] = image_chars if name == "images" else settings.max_text_chars
        elif name in ("text", "template"):
            prop["maxLength"] = settings.max_text_chars
        elif name == "image":
            prop["maxLength"] = image_chars


def _limit_compat(node: dict[str, Any], settings: Any) -> None:
    image_chars = _image_chars(settings)
    title = node.get("title", "")
    for name, prop in (node.get("properties") or {}).items():
        if title.endswith("EmbeddingsRequest") and name == "model":
            prop["enum"] = [settings.served_name]
        elif title.endswith("EmbeddingsRequest") and name == "input":
            for form in prop.get("anyOf", []):
                if form.get("type") == "array":
                    form["maxItems"] = settings.openai_max_inputs
                else:
                    form["maxLength"] = image_chars
        elif name == "documents":
            prop["maxItems"] = settings.openai_max_inputs
        elif name in ("texts", "images"):
            prop["maxItems"] = settings.max_items_per_request
            if name == "images":
                prop.setdefault("items", {})["maxLength"] = image_chars
