"""A Python client for a clipsearch server: `Client` (blocking) and `AsyncClient` (asyncio).

    from clipsearch_client import Client

    client = Client("http://localhost:8000", api_key="...")   # or CLIPSEARCH_API_KEY
    vectors = client.embed_texts(["a red circle", "a blue square"])   # (2, dim) float32
    hits = client.search_image("photo.jpg", k=5).hits

Images may be file paths, bytes, PIL images, or http(s) URLs (which the server fetches, when
it allows their host); they travel as multipart uploads, not base64. Large inputs are split
into request-sized chunks (sent side by side by `AsyncClient`), an answer of 429 or 503 is
retried after its `Retry-After`, and an error is an `APIError` that names the bad field, with
positions counted over the whole input.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from clipsearch_client.aio import gather_or_cancel

ImageInput = Any  # a path (str or os.PathLike), an http(s) URL, a data: URI, bytes, or a PIL image

RETRY_STATUSES = frozenset({429, 503})
_ITEM = re.compile(r"^(texts|images|labels|input)\[(\d+)\]")


class APIError(Exception):
    """An error answer: `status`, the server's error `type`, its `message` and the bad `field`
    (`images[12]`), if any."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {type_}: {message}")
        self.status = status
        self.type = type_
        self.message = message
        self.field = field
        self.retry_after = retry_after


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    metadata: dict[str, Any]
    text: str | None = None
    thumbnail: str | None = None  # a URL path on the server, for image hits of an index built with thumbnails
    vector: np.ndarray | None = None  # with return_vectors=True
    duplicates: tuple[str, ...] = ()  # with dedup=True: ids of the near-duplicates folded into this hit


@dataclass(frozen=True)
class SearchResults:
    hits: list[Hit]
    index_version: str


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float
    score: float


@dataclass(frozen=True)
class Similarity:
    cosine: np.ndarray  # images x texts
    probabilities: np.ndarray  # per image, softmax over the texts
    logit_scale: float


def _image_part(image: ImageInput, field: str) -> tuple[str, Any]:
    """One multipart part for an image: a file upload, or a text part holding a URL."""
    if isinstance(image, str) and image[:8].lower().startswith(("http://", "https://", "data:")):
        return field, (None, image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return field, (path.name, path.read_bytes(), "application/octet-stream")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return field, ("image", bytes(image), "application/octet-stream")
    if hasattr(image, "save"):  # a PIL image: PNG keeps its pixels exactly
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return field, ("image.png", buf.getvalue(), "image/png")
    raise TypeError(f"{field}: expected a path, a URL, bytes or a PIL image, got {type(image).__name__}")


def _form(fields: dict[str, Any], images: dict[str, Sequence[ImageInput]]) -> dict[str, Any]:
    """httpx arguments for a multipart request: text fields and image parts, in order."""
    files: list[tuple[str, Any]] = []
    for name, value in fields.items():
        for v in (value if isinstance(value, list) else [value]):
            if v is not None:
                files.append((name, (None, str(v))))
    for name, items in images.items():
        files += [_image_part(image, name) for image in items]
    return {"files": files}


def _error(response: httpx.Response, offset: int = 0) -> APIError:
    try:
        body = response.json()["error"]
        type_, message, field = body.get("type", "error"), body.get("message", ""), body.get("field")
    except (ValueError, KeyError, TypeError, AttributeError):
        type_, message, field = "http_error", response.text[:200], None
    if offset and field and (m := _ITEM.match(field)):  # a position within the whole input, not the chunk
        shifted = f"{m.group(1)}[{int(m.group(2)) + offset}]"
        message = message.replace(m.group(0), shifted, 1)
        field = shifted + field[m.end():]
    retry = response.headers.get("retry-after", "")
    return APIError(response.status_code, type_, message, field,
                    retry_after=float(retry) if retry.replace(".", "", 1).isdigit() else None)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def _hits(body: dict[str, Any]) -> SearchResults:
    return SearchResults([Hit(h["id"], h["score"], h.get("metadata") or {}, h.get("text"), h.get("thumbnail"),
                              None if h.get("vector") is None else np.asarray(h["vector"], np.float32),
                              tuple(h.get("duplicates") or ()))
                          for h in body["results"]], body["index_version"])


def _search(k: int, options: dict[str, Any]) -> dict[str, Any]:
    """The search fields of a request: k, and what of offset, filter, return_vectors, dedup,
    dedup_threshold, nprobe, ef_search and target was given."""
    return {"k": k, **{name: value for name, value in options.items() if value is not None}}


def _form_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Search fields as form parts: a filter as JSON, booleans as true/false."""
    import json

    return {name: json.dumps(v) if isinstance(v, (dict, bool)) else v for name, v in fields.items()}


def _vectors(rows: list[list[float]], dim: int | None = None) -> np.ndarray:
    out = np.asarray(rows, dtype=np.float32)
    return out.reshape(0, dim or 0) if out.size == 0 else out


class _Base:
    def __init__(self, base_url: str, *, api_key: str | None, timeout: float, max_retries: int,
                 batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.base_url = base_url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("CLIPSEARCH_API_KEY")
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.timeout = timeout
        self.max_retries = max_retries
        self.batch_size = batch_size

    def _wait(self, attempt: int, error: APIError) -> float | None:
        """Seconds to wait before retrying `error`, or None to raise it."""
        if error.status not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        if error.retry_after is not None:
            return min(error.retry_after, 60.0)
        return min(0.25 * 2**attempt, 8.0) * (0.5 + random.random() / 2)


class Client(_Base):
    """A blocking client. Use as a context manager, or call `close()`."""

    def __init__(self, base_url: str = "http://localhost:8000", *, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, batch_size: int = 32) -> None:
        super().__init__(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries, batch_size=batch_size)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, offset: int = 0, **kwargs: Any) -> Any:
        for attempt in range(self.max_retries + 1):
            response = self._http.request(method, path, **kwargs)
            if response.status_code < 400:
                return response.json()
            error = _error(response, offset)
            wait = self._wait(attempt, error)
            if wait is None:
                raise error
            time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def info(self) -> dict[str, Any]:
        """What the server serves: model, dimension, index version and sizes."""
        return self._call("GET", "/")

    def ready(self) -> bool:
        """Whether the server is ready (its model and index loaded)."""
        return self._http.get("/readyz").status_code == 200

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalized float32 vectors, one row per text, in order."""
        rows = [self._call("POST", "/embed", start, json={"texts": list(texts[start:end])})["texts"]
                for start, end in _chunks(len(texts), self.batch_size)]
        return _vectors([r for chunk in rows for r in chunk])

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """L2-normalized float32 vectors, one row per image (path, URL, bytes or PIL image), in order."""
        rows = [self._call("POST", "/embed", start, **_form({}, {"images": images[start:end]}))["images"]
                for start, end in _chunks(len(images), self.batch_size)]
        return _vectors([r for chunk in rows for r in chunk])

    def search_text(self, text: str, k: int = 10, **options: Any) -> SearchResults:
        """The k images nearest to a text. Options: offset, filter ({"colour": "red"}),
        return_vectors, mode ("lexical": by the captions' words, BM25; "hybrid": both, with
        lexical_weight), dedup (fold near-duplicates: each hit's `duplicates`; dedup_threshold,
        a cosine, 0.94), target ("text": search the texts), nprobe, ef_search."""
        return _hits(self._call("POST", "/search/text", json={"text": text, **_search(k, options)}))

    def search_image(self, image: ImageInput, k: int = 10, **options: Any) -> SearchResults:
        """The k texts nearest to an image (target="image": images). Options as `search_text`."""
        return _hits(self._call("POST", "/search/image", **_form(_form_fields(_search(k, options)),
                                                                 {"image": [image]})))

    def search_vector(self, vector: Sequence[float], k: int = 10, **options: Any) -> SearchResults:
        """The k images (target="text": texts) nearest to a vector. Options as `search_text`."""
        return _hits(self._call("POST", "/search/vector",
                                json={"vector": [float(v) for v in vector], **_search(k, options)}))

    def search_similar(self, item_id: str, k: int = 10, **options: Any) -> SearchResults:
        """More like a stored item (modality="text" for an item of the text index)."""
        return _hits(self._call("POST", "/search/similar", json={"id": item_id, **_search(k, options)}))

    def classify(self, image: ImageInput, labels: Sequence[str], template: str | None = None) -> list[LabelScore]:
        """Zero-shot labels for an image, most likely first."""
        body = self._call("POST", "/classify", **_form({"labels": list(labels), "template": template},
                                                       {"image": [image]}))
        return [LabelScore(**entry) for entry in body["labels"]]

    def similarity(self, images: Sequence[ImageInput], texts: Sequence[str]) -> Similarity:
        """Cosine similarities (images x texts) and per-image probabilities over the texts."""
        body = self._call("POST", "/similarity", **_form({"texts": list(texts)}, {"images": images}))
        return Similarity(np.asarray(body["cosine"], np.float32), np.asarray(body["probabilities"], np.float32),
                          float(body["logit_scale"]))


class AsyncClient(_Base):
    """The asyncio client: the same methods as `Client`, awaited; chunks of a large input are
    sent `max_concurrency` at a time."""

    def __init__(self, base_url: str = "http://localhost:8000", *, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, batch_size: int = 32, max_concurrency: int = 4) -> None:
        super().__init__(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries, batch_size=batch_size)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout)
        self._slots = asyncio.Semaphore(max_concurrency)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, offset: int = 0, **kwargs: Any) -> Any:
        for attempt in range(self.max_retries + 1):
            async with self._slots:
                response = await self._http.request(method, path, **kwargs)
            if response.status_code < 400:
                return response.json()
            error = _error(response, offset)
            wait = self._wait(attempt, error)
            if wait is None:
                raise error
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    async def info(self) -> dict[str, Any]:
        return await self._call("GET", "/")

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).status_code == 200

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        bodies = await gather_or_cancel(*(self._call("POST", "/embed", start, json={"texts": list(texts[start:end])})
                                      for start, end in _chunks(len(texts), self.batch_size)))
        return _vectors([r for body in bodies for r in body["texts"]])

    async def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        bodies = await gather_or_cancel(*(
            self._call("POST", "/embed", start, **_form({}, {"images": images[start:end]}))
            for start, end in _chunks(len(images), self.batch_size)))
        return _vectors([r for body in bodies for r in body["images"]])

    async def search_text(self, text: str, k: int = 10, **options: Any) -> SearchResults:
        return _hits(await self._call("POST", "/search/text", json={"text": text, **_search(k, options)}))

    async def search_image(self, image: ImageInput, k: int = 10, **options: Any) -> SearchResults:
        return _hits(await self._call("POST", "/search/image", **_form(_form_fields(_search(k, options)),
                                                                       {"image": [image]})))

    async def search_vector(self, vector: Sequence[float], k: int = 10, **options: Any) -> SearchResults:
        return _hits(await self._call("POST", "/search/vector",
                                      json={"vector": [float(v) for v in vector], **_search(k, options)}))

    async def search_similar(self, item_id: str, k: int = 10, **options: Any) -> SearchResults:
        return _hits(await self._call("POST", "/search/similar", json={"id": item_id, **_search(k, options)}))

    async def classify(self, image: ImageInput, labels: Sequence[str],
                       template: str | None = None) -> list[LabelScore]:
        body = await self._call("POST", "/classify", **_form({"labels": list(labels), "template": template},
                                                             {"image": [image]}))
        return [LabelScore(**entry) for entry in body["labels"]]

    async def similarity(self, images: Sequence[ImageInput], texts: Sequence[str]) -> Similarity:
        body = await self._call("POST", "/similarity", **_form({"texts": list(texts)}, {"images": images}))
        return Similarity(np.asarray(body["cosine"], np.float32), np.asarray(body["probabilities"], np.float32),
                          float(body["logit_scale"]))
