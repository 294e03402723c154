"""The embedding engine: the model seam behind one pipeline per modality.

Knows nothing of HTTP. Texts and images each run the batcher's stages (prepare -> collate ->
forward -> post); a search is the post step of its query's encode. Input limits are checked
here, before anything is queued, and raise typed errors that name the offending item
(``texts[3]``, ``images[0]``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from clipsearch_client.aio import gather_or_cancel

from clipsearch.core.errors import InvalidInput, PayloadTooLarge, ShuttingDown
from clipsearch.images.codec import image_input_bytes
from clipsearch.images.decoder import ImageDecoder
from clipsearch.index.dedup import fold
from clipsearch.index.format import Modality
from clipsearch.index.search import Hit, LoadedIndex, SearchParams, Selection
from clipsearch.model.base import Model, to_host
from clipsearch.service.batcher import Collated, DynamicBatcher, Stages
from clipsearch.service.fetch import ImageFetcher
from clipsearch.service.metrics import Metrics
from clipsearch.service.settings import Settings

log = logging.getLogger(__name__)

Disconnected = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class SearchJob:
    """What one query searches: the index is part of the job (search is stateless), so a hot
    reload never mixes versions inside a request."""

    index: LoadedIndex
    k: int
    params: SearchParams
    selection: Selection | None = None  # a filter's rows; None: all


_HIT = np.dtype([("id", np.int64), ("score", np.float32)])
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al.; Elasticsearch and Weaviate use it too)
HYBRID_WINDOW = 100  # hybrid search fuses each ranking's first max(k, this) hits


def search_rows(jobs: Sequence[SearchJob], queries: Any) -> np.ndarray:
    """Rows of (id, score), -1 padded to the largest k, for query row i searched as `jobs[i]`
    says: one backend call per (index, params)."""
    out = np.zeros((len(jobs), max(job.k for job in jobs)), _HIT)
    out["id"] = -1
    groups: dict[tuple[int, SearchParams, int], list[int]] = {}
    for row, job in enumerate(jobs):
        groups.setdefault((id(job.index), job.params, id(job.selection)), []).append(row)
    for rows in groups.values():
        index, params, selection = jobs[rows[0]].index, jobs[rows[0]].params, jobs[rows[0]].selection
        group = queries if len(rows) == len(jobs) else queries[rows]  # the usual case: one group, no gather
        scores, ids = index.raw_search(group, max(jobs[r].k for r in rows), params, selection)
        out["id"][rows, : ids.shape[1]] = ids
        out["score"][rows, : ids.shape[1]] = scores
    return out


class SearchThread:
    """FAISS on the CPU, in a thread of its own: every query waiting when it is free is
    searched in one call, up to `max_rows` (a flat scan costs nearly as much for one query
    as for dozens, so queries from many model batches are merged, greedily)."""

    def __init__(self, max_rows: int) -> None:
        self._max_rows = max_rows
        self._pending: deque[tuple[SearchJob, np.ndarray, Future[np.ndarray]]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._run, name="clip-search", daemon=True).start()

    def submit(self, queries: list[tuple[SearchJob, np.ndarray]]) -> list[Future[np.ndarray]]:
        """A Future of its (id, score) row for each one-row query."""
        futures: list[Future[np.ndarray]] = [Future() for _ in queries]
        with self._cond:
            if self._closed:
                raise ShuttingDown("search thread is shutting down")
            self._pending.extend((job, q, f) for (job, q), f in zip(queries, futures, strict=True))
            self._cond.notify()
        return futures

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch: list[tuple[SearchJob, np.ndarray, Future[np.ndarray]]] = []
                while self._pending and len(batch) < self._max_rows:
                    item = self._pending.popleft()
                    if item[2].set_running_or_notify_cancel():  # False: its request has ended, skip it
                        batch.append(item)
            if not batch:
                continue
            try:
                rows = search_rows([job for job, _, _ in batch], np.concatenate([q for _, q, _ in batch]))
            except Exception as exc:
                for _, _, future in batch:
                    future.set_exception(exc)
                continue
            for j, (_, _, future) in enumerate(batch):
                future.set_result(rows[j : j + 1])

    def close(self) -> None:
        with self._cond:
            self._closed = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for _, _, future in left:
            if future.set_running_or_notify_cancel():
                future.set_exception(ShuttingDown("search thread is shutting down"))


def item_name(field: str, i: int) -> str:
    """How errors name an item: `texts[3]` in a list field, plain `image` in a single-item one.

    List fields of the API are plural (texts, images, labels), or OpenAI's `input`.
    """
    return f"{field}[{i}]" if field.endswith("s") or field == "input" else field  # input: OpenAI's list


class Engine:
    def __init__(self, model: Model, settings: Settings, metrics: Metrics | None = None) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.decoder = ImageDecoder.create(model.preprocess_transform, settings.image_decode, model.image_size,
                                           settings.max_image_pixels, exif=settings.exif_orientation,
                                           device=model.device)
        if settings.image_decode == "torch" and self.decoder.torch_path is None:
            log.warning("image_decode=torch: %s has a preprocessing transform other than open_clip's "
                        "standard one, or torchvision has no JPEG decoder; images decode exactly", model.info.spec)
        # One model thread: text and image batches take turns on the device instead of
        # fighting over it (and over CPU cores when there is no GPU).
        self._model_executor = ThreadPoolExecutor(1, thread_name_prefix="clip-model")
        self._prepare_executor = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="clip-prep")
        self.fetcher = ImageFetcher(settings.image_urls, settings.image_url_networks,
                                    max_bytes=settings.max_image_bytes, timeout_s=settings.image_url_timeout_s)
        # FAISS on the CPU searches in a thread of its own, so a search never holds up an encode.
        self._searches = SearchThread(settings.max_batch_size)
        self.text = self._batcher("text", Stages(
            forward=lambda tokens: self.model.text_vectors(tokens),
            collate=self._tokenize,  # per batch: cheaper than a thread hop per request
            post=self._post,
        ))
        self.image = self._batcher("image", Stages(
            forward=lambda pixels: self.model.image_vectors(pixels),
            prepare=self._prepare_images,
            prepare_in_batch=lambda images: self.decoder.prepares_cheaply(images),
            collate=self._collate_images,
            post=self._post,
        ))

    def _batcher(self, modality: str, stages: Stages) -> DynamicBatcher:
        hooks: dict[str, Any] = {}
        if self.metrics is not None:
            batch = self.metrics.batch_size.labels(modality)
            items = self.metrics.items.labels(modality)

            def on_batch(n: int) -> None:
                batch.observe(n)
                items.inc(n)

            hooks = {"on_batch": on_batch, "on_queue_depth": self.metrics.queue_depth.labels(modality).set}
        s = self.settings
        return DynamicBatcher(modality, stages, model_executor=self._model_executor,
                              prepare_executor=self._prepare_executor, max_batch_size=s.max_batch_size,
                              max_wait_ms=s.max_wait_ms, max_queue=s.max_queue,
                              overload_wait_ms=s.overload_wait_ms,
                              # a quarter of the pool per request: several requests decode side by side
                              prepare_window=max(1, s.preprocess_workers // 4), **hooks)

    async def start(self) -> None:
        await self.text.start()
        await self.image.start()

    async def stop(self) -> None:
        await self.text.stop()
        await self.image.stop()
        self._prepare_executor.shutdown(wait=False, cancel_futures=True)
        self._model_executor.shutdown(wait=True, cancel_futures=True)
        self._searches.close()
        await self.fetcher.aclose()

    @property
    def dim(self) -> int:
        return self.model.dim

    # -- stages -------------------------------------------------------------------
    def _tokenize(self, texts: list[list[str]]) -> Any:
        return self.model.tokenize([text for chunk in texts for text in chunk])

    def _prepare_images(self, images: Sequence[str | bytes], field: str, start: int) -> list[Any]:
        names = [item_name(field, start + i) for i in range(len(images))]
        limit = self.settings.max_image_bytes
        raws = [image_input_bytes(data, field=name, max_bytes=limit) for data, name in zip(images, names, strict=True)]
        return self.decoder.prepare(raws, names)

    def prepare_images(self, images: Sequence[str | bytes], field: str = "images") -> Any:
        """What the image pipeline makes of images (base64 or bytes) before the model: the
        pixels (N, 3, H, W)."""
        payload = self._collate_images([self._prepare_images(images, field, 0)])
        if isinstance(payload, Collated):
            raise next(iter(payload.failed.values()))
        return payload

    def _collate_images(self, requests: list[list[Any]]) -> Any:
        pixels, failed = self.decoder.collate(requests)
        return Collated(pixels, dict(failed)) if failed else pixels

    def _post(self, vectors: Any, chunks: list[tuple[SearchJob | None, int]]) -> list[Any]:
        """Per batch, in the model thread: each chunk's vectors to the host, or its query
        searched: here, where the index takes the vectors on their device; else by FAISS
        in the search thread (a Future). One wait for the device per batch and kind."""
        starts = np.cumsum([0, *(rows for _, rows in chunks)])[:-1].tolist()
        out: list[Any] = [None] * len(chunks)
        here = [i for i, (job, _) in enumerate(chunks) if job is not None and job.index.searches_on(self.model.device)]
        if here:
            jobs = [job for i in here if (job := chunks[i][0]) is not None]
            rows = search_rows(jobs, _take(vectors, [starts[i] for i in here], len(chunks)))
            for j, i in enumerate(here):
                out[i] = rows[j : j + 1]
        rest = [i for i in range(len(chunks)) if out[i] is None]
        if not rest:
            return out
        host = to_host(vectors) if len(rest) == len(chunks) else to_host(
            vectors[[r for i in rest for r in range(starts[i], starts[i] + chunks[i][1])]])
        offset = 0
        later: list[tuple[int, SearchJob, np.ndarray]] = []
        for i in rest:
            job, n = chunks[i]
            part = host[offset : offset + n]
            offset += n
            if job is None:
                out[i] = part
            else:
                later.append((i, job, part))
        if later:
            futures = self._searches.submit([(job, query) for _, job, query in later])
            for (i, _, _), future in zip(later, futures, strict=True):
                out[i] = future
        return out

    # -- public API (event loop) ------------------------------------------------------
    def check_texts(self, texts: Sequence[str], field: str = "texts", offset: int = 0) -> None:
        limit = self.settings.max_text_chars
        for i, text in enumerate(texts):
            if len(text) > limit:
                name = item_name(field, offset + i)
                raise PayloadTooLarge(f"{name}: text has {len(text)} characters, the limit is {limit}", field=name)

    def check_count(self, n: int, limit: int | None = None, field: str = "texts") -> None:
        limit = self.settings.max_items_per_request if limit is None else limit
        if n > limit:
            raise PayloadTooLarge(f"{n} items in one request, the limit is {limit}")
        if n == 0:
            raise InvalidInput("no texts or images given: send at least one", field=field)

    async def embed_texts(
        self, texts: Sequence[str], *, field: str = "texts", disconnected: Disconnected | None = None,
        offset: int = 0, checked: bool = False,
    ) -> np.ndarray:
        """L2-normalized float32 vectors, one row per text, in input order. `offset`: where
        the texts start in their request (errors name them by it); `checked`: their length
        was bounded by the caller (a route that truncates)."""
        if not checked:
            self.check_texts(texts, field, offset)
        return await self.text.submit(texts, field=field, timeout=self.settings.request_timeout_s,
                                      disconnected=disconnected, offset=offset)

    async def _fetched(self, images: Sequence[str | bytes], field: str, offset: int = 0) -> Sequence[str | bytes]:
        return await self.fetcher.resolve(images, lambda i: item_name(field, offset + i))

    async def embed_images(
        self, images: Sequence[str | bytes], *, field: str = "images", disconnected: Disconnected | None = None,
        offset: int = 0,
    ) -> np.ndarray:
        """Images (base64, data: URIs, allowed URLs, or bytes) -> L2-normalized float32 vectors, in input order."""
        images = await self._fetched(images, field, offset)
        return await self.image.submit(images, field=field, timeout=self.settings.request_timeout_s,
                                       disconnected=disconnected, offset=offset)

    async def embed_both(
        self, texts: Sequence[str], images: Sequence[str | bytes], *, disconnected: Disconnected | None = None,
        checked: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Texts and images of one request, side by side: (text vectors, image vectors), each
        (0, dim) when none was given."""
        empty = np.zeros((0, self.dim), np.float32)
        jobs = []
        if texts:
            jobs.append(self.embed_texts(texts, disconnected=disconnected, checked=checked))
        if images:
            jobs.append(self.embed_images(images, disconnected=disconnected))
        results = await gather_or_cancel(*jobs) if jobs else []
        return (results.pop(0) if texts else empty), (results.pop(0) if images else empty)

    def unit_vector(self, values: Sequence[float], field: str) -> np.ndarray:
        """A query vector given by a client, L2-normalized, (1, dim) float32; 400 naming `field`
        unless it has the model's dimension, is finite and not all zeros."""
        vector = np.asarray(values, np.float64)
        if len(vector) != self.dim:
            raise InvalidInput(f"{field}: {len(vector)} numbers, the model's dimension is {self.dim}", field=field)
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise InvalidInput(f"{field}: must be finite and not all zeros", field=field)
        return (vector / norm).astype(np.float32)[None]

    async def embed_many(
        self, items: Sequence[Any], modality: Modality, *, field: str, disconnected: Disconnected | None = None,
        checked: bool = False,
    ) -> np.ndarray:
        """A request of more items than one batch takes (the OpenAI-style routes' 2,048): run
        `max_items_per_request` at a time, two parts in flight, so that it holds at most two
        parts' images in memory and other clients' requests queue between its parts. One
        answer in input order, or the first error, naming the item by its place in the request."""
        part = self.settings.max_items_per_request
        if len(items) <= part:
            return await self._embed(items, modality, field, disconnected, 0, checked)
        window = asyncio.Semaphore(2)

        async def run(lo: int) -> np.ndarray:
            async with window:
                return await self._embed(items[lo : lo + part], modality, field, disconnected, lo, checked)

        parts = await gather_or_cancel(*(run(lo) for lo in range(0, len(items), part)))
        return np.concatenate(parts)

    async def _embed(self, items: Sequence[Any], modality: Modality, field: str, disconnected: Disconnected | None,
                     offset: int, checked: bool) -> np.ndarray:
        if modality == "image":
            return await self.embed_images(items, field=field, disconnected=disconnected, offset=offset)
        return await self.embed_texts(items, field=field, disconnected=disconnected, offset=offset, checked=checked)

    async def search_text(
        self, job: SearchJob, text: str, *, field: str = "text", disconnected: Disconnected | None = None,
    ) -> list[Hit]:
        """Top-k hits for a text, batched with concurrent text requests."""
        self.check_texts([text], field)
        rows = await self.text.submit([text], field=field, post=job, timeout=self.settings.request_timeout_s,
                                      disconnected=disconnected)
        return _hits(job.index, rows, job.k)

    async def search_vector(self, job: SearchJob, vector: np.ndarray) -> list[Hit]:
        """Top-k hits for a given (1, dim) vector, searched with concurrent queries; no model call."""
        rows = await asyncio.wrap_future(self._searches.submit([(job, np.ascontiguousarray(vector, np.float32))])[0])
        return _hits(job.index, rows, job.k)

    async def search_similar(self, job: SearchJob, row: int) -> list[Hit]:
        """Top-k hits for a stored item's own vector ("more like this"), the item itself left out."""
        wider = replace(job, k=min(job.k + 1, job.index.count))
        return _drop(await self.search_vector(wider, job.index.vector(row)), row, job.k)

    async def search_distinct(self, job: SearchJob, vector: np.ndarray, threshold: float, leave_out: int | None = None
                              ) -> list[tuple[Hit, list[Hit]]]:
        """The first `job.k` distinct hits for a (1, dim) query vector, each with the hits folded
        into it (`dedup.fold`: within `threshold` cosine of a better-ranked kept hit). The
        search runs deeper until `job.k` distinct hits are found, the index (or the filter's
        rows) runs out, or it has looked at 16 times `job.k` hits: a page of near-copies of
        one picture costs a bounded search, and may come back short. `leave_out`: a row
        dropped with everything folded into it (the item a "more like this" started from)."""
        want = job.k
        cap = min(job.index.count, 16 * want + (leave_out is not None))
        depth = min(cap, 2 * want + 8)
        while True:
            hits = await self.search_vector(replace(job, k=depth), vector)
            into = fold(job.index.vectors_of(np.asarray([h.row for h in hits], np.int64)), threshold)
            kept = [i for i in range(len(hits)) if into[i] == i and hits[i].row != leave_out]
            if len(kept) >= want or len(hits) < depth or depth >= cap:
                break
            depth = min(cap, 2 * depth)
        folded: dict[int, list[Hit]] = {}
        for i, root in enumerate(into):
            if root != i:
                folded.setdefault(int(root), []).append(hits[i])
        return [(hits[i], folded.get(i, [])) for i in kept[:want]]

    async def search_words(self, job: SearchJob, text: str, mode: str, lexical_weight: float = 1.0, *,
                           disconnected: Disconnected | None = None) -> list[Hit]:
        """Top-k hits for a text by its words. `lexical`: the items whose text holds any of the
        query's terms, by BM25 (`index.lexical`). `hybrid`: reciprocal rank fusion of the vector
        ranking and the BM25 ranking, each cut at its first max(k, HYBRID_WINDOW) hits (as
        Elasticsearch's rank_window_size): score = 1/(60 + vector rank) + lexical_weight /
        (60 + BM25 rank), a ranking's term 0 for an item it does not hold; ties by row."""
        lexical = job.index.lexical
        if lexical is None:
            raise InvalidInput(f"mode: {mode} search needs the items' texts, and this {job.index.modality} index "
                               "has none (no texts in its items, or built before lexical indexes: rebuild it)",
                               field="mode")
        self.check_texts([text], "text")
        mask = job.selection.mask if job.selection is not None else None
        if mode == "lexical":
            rows, scores = await asyncio.to_thread(lexical.search, text, job.k, mask)
            return job.index.to_hits(scores[None], rows[None])[0]
        window = max(job.k, HYBRID_WINDOW)
        words = asyncio.ensure_future(asyncio.to_thread(lexical.search, text, window, mask))
        try:
            vector_hits = await self.search_text(replace(job, k=min(window, job.index.count)), text,
                                                 disconnected=disconnected)
        finally:
            rows, _ = await words  # a thread cannot be cancelled: its result is awaited either way
        fused: dict[int, float] = {}
        for rank, hit in enumerate(vector_hits, 1):
            fused[hit.row] = 1.0 / (RRF_K + rank)
        for rank, row in enumerate(rows.tolist(), 1):
            fused[row] = fused.get(row, 0.0) + lexical_weight / (RRF_K + rank)
        best = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[: job.k]
        return job.index.to_hits(np.asarray([[s for _, s in best]], np.float32),
                                 np.asarray([[r for r, _ in best]], np.int64))[0]

    async def search_image(
        self, job: SearchJob, image: str | bytes, *, field: str = "image", disconnected: Disconnected | None = None,
    ) -> list[Hit]:
        """Top-k hits for an image, batched with concurrent image requests."""
        images = await self._fetched([image], field)
        rows = await self.image.submit(images, field=field, post=job, timeout=self.settings.request_timeout_s,
                                       disconnected=disconnected)
        return _hits(job.index, rows, job.k)


def _drop(hits: list[Hit], row: int, k: int) -> list[Hit]:
    return [h for h in hits if h.row != row][:k]


def _take(vectors: Any, rows: list[int], total: int) -> Any:
    """`vectors[rows]`, without a gather when the rows are all of them in order."""
    return vectors if len(rows) == total == len(vectors) else vectors[rows]


def _hits(index: LoadedIndex, rows: np.ndarray, k: int) -> list[Hit]:
    row = rows[0][:k]
    return index.to_hits(row["score"][None], row["id"][None])[0]
