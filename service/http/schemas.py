"""Request and response bodies of the HTTP API (the contract in the README)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    # Unknown fields are an error: a typo ("text" for "texts") must not pass silently.
    model_config = ConfigDict(extra="forbid")


class EmbedRequest(_Request):
    texts: list[str] = Field(default_factory=list, description="texts to embed")
    images: list[str] = Field(default_factory=list, description="base64 images (standard or urlsafe, data: URIs ok)")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    texts: list[list[float]]
    images: list[list[float]]


class _SearchRequest(_Request):
    k: int = Field(10, ge=1, description="number of results (at most the max_k setting)")
    nprobe: int | None = Field(None, ge=1, le=65536, description="IVF lists to visit (default: the manifest's)")
    ef_search: int | None = Field(None, ge=1, le=65536, description="HNSW efSearch (default: the manifest's)")


class TextSearchRequest(_SearchRequest):
    text: str = Field(description="query text, searched in the image index")


class ImageSearchRequest(_SearchRequest):
    image: str = Field(description="base64 query image, searched in the text index")


class SearchHit(BaseModel):
    id: str
    score: float
    metadata: dict[str, Any] = Field(default_factory=dict)
    text: str | None = None


class SearchResponse(BaseModel):
    results: list[SearchHit]
    index_version: str


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ClassifyRequest(_Request):
    image: str = Field(description="base64 image to classify")
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
    images: list[str] = Field(min_length=1, description="base64 images")


class SimilarityResponse(BaseModel):
    cosine: list[list[float]] = Field(description="images x texts cosine similarities")
    probabilities: list[list[float]] = Field(description="per image, softmax over texts of logit_scale x cosine")
    logit_scale: float
