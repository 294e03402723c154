"""The embedding engine: the model seam behind one dynamic batcher per modality.

Knows nothing of HTTP. Input limits are checked here, before anything is queued, and
raise typed errors that name the offending item (``texts[3]``, ``images[0]``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.batcher import Collated, DynamicBatcher
from service.errors import ClipsearchError, InvalidImage, InvalidInput, PayloadTooLarge
from service.images import base64_looks_like_jpeg, decode_base64
from service.metrics import Metrics
from service.model import ClipModel
from service.search import Hit, LoadedIndex, SearchParams
from service.settings import Settings
from service.torch_preprocess import ImageDecoder, Jpeg

log = logging.getLogger(__name__)

Disconnected = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class SearchJob:
    """What one query searches: the index is part of the job (search is stateless), so a hot
    reload never mixes versions inside a request."""

    index: LoadedIndex
    k: int
    params: SearchParams


@dataclass(frozen=True)
class TextQueries:
    """A collated batch of text searches: token rows and the search each row is for.
    Indexable by a list of rows, as the batcher needs to drop requests that ended."""

    tokens: torch.Tensor
    jobs: list[SearchJob]

    def __getitem__(self, rows: list[int]) -> TextQueries:
        return TextQueries(self.tokens[rows], [self.jobs[r] for r in rows])


@dataclass(frozen=True, slots=True)
class Base64Jpeg:
    """An image that arrived as base64 beginning as a JPEG does, left for the batch's collate
    step to decode and check (`Engine._collate_images`): on the per-batch JPEG path
    that work (~20 us) is less than a hop through the prepare threads costs the event loop."""

    name: str
    data: str


_HIT = np.dtype([("id", np.int64), ("score", np.float32)])


def search_rows(jobs: Sequence[SearchJob], queries: np.ndarray | torch.Tensor) -> np.ndarray:
    """Rows of (id, score), -1 padded to the largest k, for query row i searched as `jobs[i]`
    says: one backend call per (index, params)."""
    out = np.zeros((len(jobs), max(job.k for job in jobs)), _HIT)
    out["id"] = -1
    groups: dict[tuple[int, SearchParams], list[int]] = {}
    for row, job in enumerate(jobs):
        groups.setdefault((id(job.index), job.params), []).append(row)
    for rows in groups.values():
        index, params = jobs[rows[0]].index, jobs[rows[0]].params
        group = queries if len(rows) == len(jobs) else queries[rows]  # the usual case: one group, no gather
        scores, ids = index.raw_search(group, max(jobs[r].k for r in rows), params)
        out["id"][rows, : ids.shape[1]] = ids
        out["score"][rows, : ids.shape[1]] = scores
    return out


def item_name(field: str, i: int) -> str:
    """How errors name an item: `texts[3]` in a list field, plain `image` in a single-item one.

    List fields of the API are plural (texts, images, labels); single ones are not.
    """
    return f"{field}[{i}]" if field.endswith("s") else field


class Engine:
    def __init__(self, model: ClipModel, settings: Settings, metrics: Metrics | None = None) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self._decoder = ImageDecoder.create(model.preprocess_transform, settings.image_decode, model.image_size,
                                            settings.max_image_pixels, exif=settings.exif_orientation)
        if settings.image_decode == "torch" and self._decoder.torch_path is None:
            log.warning("image_decode=torch: %s has a preprocessing transform other than open_clip's "
                        "standard one, or torchvision has no JPEG decoder; images decode exactly", model.info.spec)
        # One model thread: text and image batches take turns on the device instead of
        # fighting over it (and over CPU cores when there is no GPU).
        self._model_executor = ThreadPoolExecutor(1, thread_name_prefix="clip-model")
        self._prepare_executor = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="clip-prep")
        common: dict[str, Any] = {
            "model_executor": self._model_executor,
            "prepare_executor": self._prepare_executor,
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue": settings.max_queue,
        }
        # Texts are tokenized per batch (collate), not per request: the CLIP tokenizer
        # takes ~11 us a text, less than a thread hop per request costs (bench/NOTES.md).
        self.text: DynamicBatcher[list[str]] = DynamicBatcher(
            "text", self._infer_text, collate=self._collate_texts, **common, **self._hooks("text")
        )
        # JPEGs on the torch path decode per request in the prepare threads (parallel
        # libjpeg-turbo on the CPU), or per batch in one nvJPEG call (a GPU decodes a batch
        # far faster than the same images one call each).
        scope = settings.image_decode_scope
        if scope == "auto":
            scope = "batch" if model.device.type == "cuda" else "request"
        self.jpegs_per_batch = self._decoder.torch_path is not None and scope == "batch"
        image_collate: Callable[[list[Any]], Any] | None = None
        if self.jpegs_per_batch:
            image_collate = self._collate_images
        elif model.device.type == "cuda":
            image_collate = self._collate_pixels
        self.image: DynamicBatcher[Any] = DynamicBatcher(
            "image", self._infer_image, collate=image_collate, **common, **self._hooks("image"),
        )
        # Queries from concurrent requests are searched together: one matrix product (or
        # one FAISS call, which uses BLAS from ~20 queries) instead of one scan each.
        # Its own thread, so a search never waits behind an encode.
        self._search_executor = ThreadPoolExecutor(1, thread_name_prefix="clip-search")
        self.searcher: DynamicBatcher[list[tuple[SearchJob, np.ndarray]]] = DynamicBatcher(
            "search", self._infer_search, **{**common, "model_executor": self._search_executor},
            **self._hooks("search"),
        )
        # Text searches against an index searched by torch on the model's device: encoded and
        # searched in one model-thread step, the query vectors never leaving the device (no
        # device -> host -> device round trip, and one batcher hop instead of two).
        self.text_search: DynamicBatcher[list[tuple[str, SearchJob]]] = DynamicBatcher(
            "text_search", self._infer_text_search, collate=self._collate_text_searches, **common,
            **self._hooks("text_search"),
        )

    def _hooks(self, modality: str) -> dict[str, Any]:
        if self.metrics is None:
            return {}
        batch = self.metrics.batch_size.labels(modality)
        depth = self.metrics.queue_depth.labels(modality)
        items = self.metrics.items.labels(modality)

        def on_batch(n: int) -> None:
            batch.observe(n)
            items.inc(n)

        return {"on_batch": on_batch, "on_queue_depth": depth.set}

    async def start(self) -> None:
        await self.text.start()
        await self.image.start()
        await self.searcher.start()
        await self.text_search.start()

    async def stop(self) -> None:
        await self.text.stop()
        await self.image.stop()
        await self.searcher.stop()
        await self.text_search.stop()
        self._prepare_executor.shutdown(wait=False, cancel_futures=True)
        self._model_executor.shutdown(wait=True, cancel_futures=True)
        self._search_executor.shutdown(wait=True, cancel_futures=True)

    @property
    def dim(self) -> int:
        return self.model.dim

    # -- model calls (model thread) ---------------------------------------------------
    def _infer_text(self, tokens: torch.Tensor) -> np.ndarray:
        return self.model.encode_tokens(tokens)

    def _infer_image(self, payload: torch.Tensor | list[torch.Tensor]) -> np.ndarray:
        if isinstance(payload, list):  # not collated (the CPU): one tensor per request
            payload = gather_rows(payload, self.model.device)
        return self.model.encode_pixels(payload)

    @staticmethod
    def _infer_search(payloads: list[list[tuple[SearchJob, np.ndarray]]]) -> np.ndarray:
        pairs = [pair for p in payloads for pair in p]
        return search_rows([job for job, _ in pairs], np.stack([query for _, query in pairs]))

    def _infer_text_search(self, queries: TextQueries) -> np.ndarray:
        return search_rows(queries.jobs, self.model.text_vectors(queries.tokens))

    # -- CPU work: per request in the prepare threads, per batch (collate) in a batcher's stager thread
    def _collate_texts(self, payloads: list[list[str]]) -> torch.Tensor:
        return self.model.tokenize([text for texts in payloads for text in texts])

    def _collate_text_searches(self, payloads: list[list[tuple[str, SearchJob]]]) -> TextQueries:
        pairs = [pair for p in payloads for pair in p]
        return TextQueries(self.model.tokenize([text for text, _ in pairs]), [job for _, job in pairs])

    def _raw(self, data: str, name: str) -> bytes:
        return decode_base64(data, field=name, max_bytes=self.settings.max_image_bytes)

    def _prepare_images(self, images: Sequence[str], field: str) -> torch.Tensor | list[torch.Tensor | Jpeg]:
        names = [item_name(field, i) for i in range(len(images))]
        raws = [self._raw(data, name) for data, name in zip(images, names, strict=True)]
        if self.jpegs_per_batch:  # checked here (bad base64, headers, limits); decoded in `_collate_images`
            return self._decoder.split(raws, names)
        return self._decoder.pixels(raws, names, self.model.device)

    def _collate_pixels(self, payloads: list[torch.Tensor]) -> torch.Tensor:
        """On a GPU, the batch's pixels decoded on the CPU are gathered into one page-locked
        tensor here, in the batcher's stager thread (overlapping the previous batch when a full
        batch waits): the model thread is left one asynchronous copy instead of a
        concatenation and a pinning copy (~0.6 MB an image)."""
        return gather_rows(payloads, self.model.device)

    def _check_jpeg(self, item: Base64Jpeg) -> torch.Tensor | Jpeg:
        return self._decoder.split([self._raw(item.data, item.name)], [item.name])[0]

    def _collate_images(self, payloads: list[list[torch.Tensor | Jpeg | Base64Jpeg]]) -> Collated:
        """All JPEGs of a batch in one decoder call (those still in base64 are decoded and
        checked first); a request with bad base64, a bad header, or an image the decoder and
        PIL both reject fails alone (its rows become placeholders, dropped before the model)."""
        device = self.model.device
        failed: dict[int, Exception] = {}
        checked: list[list[torch.Tensor | Jpeg]] = []
        for i, items in enumerate(payloads):
            try:
                checked.append([self._check_jpeg(it) if isinstance(it, Base64Jpeg) else it for it in items])
            except ClipsearchError as exc:
                failed[i] = exc
                checked.append([])
        resolved = iter(self._decoder.resolve([item for items in checked for item in items], device))
        placeholder = torch.zeros((3, *self.model.image_size), device=device)
        rows: list[torch.Tensor] = []
        for i, items in enumerate(payloads):
            if i in failed:
                rows.extend(placeholder for _ in items)
                continue
            for _ in items:
                item = next(resolved)
                if isinstance(item, InvalidImage):
                    failed.setdefault(i, item)
                    item = placeholder
                rows.append(item.to(device))
        return Collated(torch.stack(rows), failed)

    # -- public API (event loop) ------------------------------------------------------
    def check_texts(self, texts: Sequence[str], field: str = "texts") -> None:
        limit = self.settings.max_text_chars
        for i, text in enumerate(texts):
            if len(text) > limit:
                name = item_name(field, i)
                raise PayloadTooLarge(f"{name}: text has {len(text)} characters, the limit is {limit}", field=name)

    def check_count(self, n: int) -> None:
        limit = self.settings.max_items_per_request
        if n > limit:
            raise PayloadTooLarge(f"{n} items in one request, the limit is {limit}")
        if n == 0:
            raise InvalidInput("no texts or images given: send at least one", field="texts")

    async def embed_texts(
        self, texts: Sequence[str], *, field: str = "texts", disconnected: Disconnected | None = None
    ) -> np.ndarray:
        """L2-normalized float32 vectors, one row per text, in input order."""
        self.check_texts(texts, field)
        return await self.text.submit(
            len(texts), payload=list(texts),
            timeout=self.settings.request_timeout_s, disconnected=disconnected,
        )

    async def search(
        self, index: LoadedIndex, query: np.ndarray, k: int, params: SearchParams,
        *, disconnected: Disconnected | None = None,
    ) -> list[Hit]:
        """Top-k hits for one query vector, batched with concurrent searches."""
        job = SearchJob(index, k, params)
        rows = await self.searcher.submit(1, payload=[(job, np.asarray(query, np.float32).reshape(-1))],
                                          timeout=self.settings.request_timeout_s, disconnected=disconnected)
        return _hits(index, rows, k)

    def searches_text_on_device(self, index: LoadedIndex | None) -> bool:
        """Whether text searches of `index` take the one-step path (see `text_search`)."""
        return index is not None and self.settings.text_search_on_device and index.searches_on(self.model.device)

    async def search_text(
        self, index: LoadedIndex, text: str, k: int, params: SearchParams,
        *, field: str = "text", disconnected: Disconnected | None = None,
    ) -> list[Hit]:
        """Top-k hits for a text, batched with concurrent text searches: in one step on the
        device when `index` is searched there (see `text_search`), else encode, then search."""
        if not self.searches_text_on_device(index):
            vector = await self.embed_texts([text], field=field, disconnected=disconnected)
            return await self.search(index, vector[0], k, params, disconnected=disconnected)
        self.check_texts([text], field)
        rows = await self.text_search.submit(1, payload=[(text, SearchJob(index, k, params))],
                                             timeout=self.settings.request_timeout_s, disconnected=disconnected)
        return _hits(index, rows, k)

    async def search_image(
        self, index: LoadedIndex, image: str, k: int, params: SearchParams,
        *, field: str = "image", disconnected: Disconnected | None = None,
    ) -> list[Hit]:
        """Top-k hits for a base64 image: encode it, then search (both batched)."""
        vector = await self.embed_images([image], field=field, disconnected=disconnected)
        return await self.search(index, vector[0], k, params, disconnected=disconnected)

    async def embed_images(
        self, images: Sequence[str], *, field: str = "images", disconnected: Disconnected | None = None
    ) -> np.ndarray:
        """base64 images -> L2-normalized float32 vectors, in input order."""
        if self.jpegs_per_batch and all(map(base64_looks_like_jpeg, images)):
            return await self.image.submit(
                len(images), payload=[Base64Jpeg(item_name(field, i), image) for i, image in enumerate(images)],
                timeout=self.settings.request_timeout_s, disconnected=disconnected,
            )
        return await self.image.submit(
            len(images), lambda: self._prepare_images(images, field),
            timeout=self.settings.request_timeout_s, disconnected=disconnected,
        )


def _hits(index: LoadedIndex, rows: np.ndarray, k: int) -> list[Hit]:
    row = rows[0][:k]
    return index.to_hits(row["score"][None], row["id"][None])[0]


def gather_rows(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One tensor of all rows for a model on `device`: on the CPU as they are; for a GPU,
    page-locked when all rows are on the CPU (so the copy to it is asynchronous), else on it."""
    pin = device.type == "cuda"
    if len(tensors) == 1 and not pin:
        return tensors[0]
    if any(t.device.type != "cpu" for t in tensors):  # decoded on the device (nvJPEG per request)
        return torch.cat([t.to(device) for t in tensors])
    if not pin:
        return torch.cat(list(tensors))
    first = tensors[0]
    out = torch.empty((sum(len(t) for t in tensors), *first.shape[1:]), dtype=first.dtype, pin_memory=True)
    return torch.cat(list(tensors), out=out)
