"""The APIs of other services, each a thin router over the same engine, switched by one
setting each (docs/api.md, "Use it from ..."): OpenAI's embeddings, infinity's, clip-retrieval's
back end, Weaviate's multi2vec-clip inference container and immich's machine learning."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter

from clipsearch.service.http.compat import clip_retrieval, immich, infinity, openai, weaviate
from clipsearch.service.settings import Settings


def routers(settings: Settings) -> list[APIRouter]:
    """The routers the settings switch on."""
    chosen = (
        (openai.router, settings.openai_api),
        (infinity.router, settings.infinity_api),
        (clip_retrieval.router, settings.clip_retrieval_api),
        (weaviate.router, settings.weaviate_api),
        (immich.router, settings.immich_api),
    )
    return [router for router, on in chosen if on]


def many_items(settings: Settings) -> Callable[[str], bool]:
    """Whether a path takes up to `openai_max_inputs` items (a larger body limit)."""
    paths = {p for p, on in (("/v1/embeddings", settings.openai_api), ("/embeddings", settings.infinity_api),
                             ("/rerank", settings.infinity_api)) if on}
    return paths.__contains__
