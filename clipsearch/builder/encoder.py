"""Encoder stage: records -> vectors, through the service's own model seam.

Images are decoded and preprocessed (the model's own open_clip transform, the same
validation and limits as the service) in worker processes that run ahead of the
model: a span streams through in chunks of one model batch, and decoding of the next
chunk overlaps encoding of the current one. With
`image_decode=torch` on a GPU the workers only read and check the JPEGs, and each model
batch of them decodes in one nvJPEG call on the device (the decoder decides). Bad records
are not fatal: each one comes back as an `ItemError` with its source.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipsearch.core.errors import ClipsearchError, InvalidImage
from clipsearch.core.orphans import init_after_watch, watched
from clipsearch.images.codec import decode_base64
from clipsearch.images.decoder import CPU, ImageDecoder, Jpeg
from clipsearch.inputs.readers import InputError, Record, open_input
from clipsearch.model.base import Model

_DECODER: ImageDecoder | None = None
_MAX_BYTES = 0
_DEFER_JPEGS = False
_THUMBNAILS = True

Decoded = tuple[np.ndarray | Jpeg | None, str | None, bytes, str]  # pixels, why not, thumbnail, sha256


def _init_worker(decoder: ImageDecoder, max_bytes: int, defer_jpegs: bool, thumbnails: bool) -> None:
    global _DECODER, _MAX_BYTES, _DEFER_JPEGS, _THUMBNAILS
    _one_torch_thread()
    _DECODER, _MAX_BYTES, _DEFER_JPEGS, _THUMBNAILS = decoder, max_bytes, defer_jpegs, thumbnails


def _one_torch_thread() -> None:
    """A decode worker's torch (when the model's transform runs on torch) keeps to one thread."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def _reason(exc: ClipsearchError) -> str:
    return exc.message.removeprefix("image: ")


def _decode_one(image_b64: str | None, image_path: str | None, image_bytes: bytes | None = None) -> Decoded:
    """One image -> (C,H,W) float32 array (or a checked `Jpeg` left for the device) and its
    thumbnail, or (None, reason, b""). Runs in a worker."""
    max_bytes, decoder = _MAX_BYTES, _DECODER
    if decoder is None:
        return None, "decoder not initialised", b"", ""
    try:
        if image_bytes is not None:  # Parquet and WebDataset carry the file's bytes
            if len(image_bytes) > max_bytes:
                return None, f"image is larger than {max_bytes} bytes", b"", ""
            data = image_bytes
        elif image_path is not None:
            try:
                with open_input(image_path) as f:  # a local path or an fsspec URL
                    data = f.read(max_bytes + 1)
            except (OSError, ValueError, ImportError) as exc:  # an unknown protocol, its package missing
                return None, f"cannot read image file ({getattr(exc, 'strerror', None) or exc})", b"", ""
            if len(data) > max_bytes:
                return None, f"image file is larger than {max_bytes} bytes", b"", ""
        elif image_b64 is not None:
            data = decode_base64(image_b64, field="image", max_bytes=max_bytes)
        else:
            return None, "no image", b"", ""
        thumbnail = b""
        if _THUMBNAILS:  # from the same decode where the image decodes here
            item, thumbnail = decoder.pixels_and_thumbnail(data, "image")
        else:
            item = decoder.split([data], ["image"])[0]
        if isinstance(item, Jpeg) and not _DEFER_JPEGS:
            item = ImageDecoder._raise(decoder.resolve([item], CPU)[0])
        digest = hashlib.sha256(data).hexdigest()  # for --dedup: the same bytes are the same image
        return (item if isinstance(item, Jpeg) else np.asarray(item)), None, thumbnail, digest
    except ClipsearchError as exc:
        return None, _reason(exc), b"", ""
    except Exception as exc:  # a decoder or transform failure on one file must not stop the job
        return None, f"cannot preprocess image ({type(exc).__name__}: {exc})", b"", ""


def _decode_many(jobs: Sequence[tuple[str | None, str | None, bytes | None]]) -> list[Decoded]:
    return [_decode_one(b64, path, raw) for b64, path, raw in jobs]


@dataclass
class ItemError:
    source: str
    field: str
    reason: str


@dataclass
class ShardResult:
    image_vectors: np.ndarray
    image_items: list[dict[str, Any]]
    text_vectors: np.ndarray
    text_items: list[dict[str, Any]]
    errors: list[ItemError] = field(default_factory=list)
    records: int = 0
    thumbnails: list[bytes] = field(default_factory=list)  # one per image item (b"": none), or empty: off


class PendingChunk:
    """A chunk of records whose image decoding is under way in the pool."""

    def __init__(self, records: list[Record], futures: list[Future[list[Decoded]]],
                 image_records: list[Record]):
        self.records = records
        self.futures = futures
        self.image_records = image_records


class Encoder:
    def __init__(self, model: Model, *, workers: int = 0, batch_size: int = 256,
                 max_image_bytes: int = 20 * 1024 * 1024, max_image_pixels: int = 100_000_000,
                 image_decode: str = "exact", exif_orientation: bool = False, thumbnails: bool = True) -> None:
        """When the decoder takes JPEGs a batch at a time (torch decoding on a GPU), they
        decode in this process, a model batch per decoder call on the model's device, and
        the workers only check them; otherwise each decodes fully in a worker."""
        self.model = model
        self.batch_size = batch_size
        self._chunk = 16
        decoder = ImageDecoder.create(model.preprocess_transform, image_decode, model.image_size, max_image_pixels,
                                      exif=exif_orientation, device=model.device)
        self.jpegs_per_batch = decoder.jpegs_per_batch
        self._decoder = decoder
        self.thumbnails = thumbnails
        self._pool: Executor
        if workers > 0 and not self.jpegs_per_batch:
            # spawn, not fork: forking a process that already runs torch's thread pools can hang.
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=init_after_watch,
                initargs=watched(f"{__name__}:_init_worker", decoder, max_image_bytes, self.jpegs_per_batch,
                                 thumbnails))
        else:
            # JPEGs decoded on the device leave only base64 and a header check per image, less
            # than shipping the image to a process and back costs: threads here do it.
            _init_worker(decoder, max_image_bytes, self.jpegs_per_batch, thumbnails)
            self._pool = ThreadPoolExecutor(2)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def encode(self, records: Iterable[Record]) -> ShardResult:
        """Encode a span's records, `batch_size` at a time: each chunk's images decode while
        the chunk before it encodes, and only two chunks' images are held at once (a whole span
        of base64 images in fresh memory made reading itself the bound)."""
        parts: list[ShardResult] = []
        rest = iter(records)
        chunks: Iterable[list[Record]] = iter(lambda: list(itertools.islice(rest, self.batch_size)), [])
        pending: PendingChunk | None = None
        for chunk in itertools.chain(chunks, [None]):
            nxt = self.start(chunk) if chunk is not None else None
            if pending is not None:
                parts.append(self.finish(pending))
            pending = nxt
        return _merge(parts, self.model.dim)

    def start(self, records: list[Record]) -> PendingChunk:
        """Submit the image decoding of a chunk of records; returns at once."""
        image_records = [r for r in records if r.error is None and (r.image_b64 is not None or r.image_path
                                                                     or r.image_bytes is not None)]
        jobs = [(r.image_b64, r.image_path, r.image_bytes) for r in image_records]
        futures = [self._pool.submit(_decode_many, jobs[i : i + self._chunk]) for i in range(0, len(jobs), self._chunk)]
        return PendingChunk(records, futures, image_records)

    def finish(self, pending: PendingChunk) -> ShardResult:
        """Encode the chunk's texts, wait for its decoded images and encode them; report bad items."""
        errors: list[ItemError] = []
        text_records: list[Record] = []
        given: list[Record] = []  # records that carry their vectors (an embeddings folder)
        for rec in pending.records:
            if rec.error is not None:
                errors.append(ItemError(rec.source, "record", rec.error))
                continue
            if rec.image_vector is not None or rec.text_vector is not None:
                given.append(rec)
                continue
            if rec.text is not None:
                if rec.text.strip():
                    text_records.append(rec)
                else:
                    errors.append(ItemError(rec.source, "text", "empty text"))
        texts = [r.text or "" for r in text_records]
        text_vectors = self.model.encode_texts(texts, batch_size=self.batch_size)
        text_items = [_item(r, with_text=True) for r in text_records]

        image_vectors: list[np.ndarray] = []
        image_items: list[dict[str, Any]] = []
        thumbnails: list[bytes] = []
        batch: list[tuple[Record, np.ndarray | Jpeg, bytes, str]] = []
        decoded = (res for fut in pending.futures for res in fut.result())
        for rec, (pixels, reason, thumb, digest) in zip(pending.image_records, decoded, strict=True):
            if pixels is None:
                errors.append(ItemError(rec.source, "image", reason or "bad image"))
                continue
            batch.append((rec, pixels, thumb, digest))
            if len(batch) == self.batch_size:
                self._encode_images(batch, image_vectors, image_items, thumbnails, errors)
                batch = []
        if batch:
            self._encode_images(batch, image_vectors, image_items, thumbnails, errors)
        if given:
            text_vectors, text_items = self._take_given(given, image_vectors, image_items, thumbnails, text_vectors,
                                                        text_items)
        dim = self.model.dim
        return ShardResult(
            image_vectors=np.concatenate(image_vectors) if image_vectors else np.zeros((0, dim), np.float32),
            image_items=image_items,
            text_vectors=text_vectors,
            text_items=text_items,
            errors=errors,
            records=len(pending.records),
            thumbnails=thumbnails if self.thumbnails else [],
        )

    def _take_given(self, records: list[Record], image_vectors: list[np.ndarray], image_items: list[dict[str, Any]],
                    thumbnails: list[bytes], text_vectors: np.ndarray, text_items: list[dict[str, Any]]
                    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Precomputed vectors as they are (no model pass), after a check of their dimension:
        an image vector makes an image item (its caption its text, no thumbnail), a text vector
        a text item."""
        first = next(v for r in records for v in (r.image_vector, r.text_vector) if v is not None)
        if len(first) != self.model.dim:
            raise InputError(f"{records[0].source}: vectors of dim {len(first)}, the model "
                             f"{self.model.info.spec} has {self.model.dim}: name the model that made them")
        images = [r for r in records if r.image_vector is not None]
        if images:
            image_vectors.append(np.stack([r.image_vector for r in images]).astype(np.float32, copy=False))
            image_items.extend({**_item(r, with_text=r.text is not None), "sha256": None} for r in images)
            thumbnails.extend(b"" for _ in images)
        texts = [r for r in records if r.text_vector is not None]
        if texts:
            text_vectors = np.concatenate([text_vectors, np.stack([r.text_vector for r in texts])]).astype(np.float32)
            text_items = text_items + [_item(r, with_text=True) for r in texts]
        return text_vectors, text_items

    def _encode_images(self, batch: list[tuple[Record, np.ndarray | Jpeg, bytes, str]], vectors: list[np.ndarray],
                       items: list[dict[str, Any]], thumbnails: list[bytes], errors: list[ItemError]) -> None:
        """One model call; the batch's JPEGs (if left for the device) decode first, in one call."""
        device = self.model.device
        pending = [p for _, p, _, _ in batch]
        jpegs = any(isinstance(p, Jpeg) for p in pending)
        rows = []
        for (rec, _, thumb, digest), row in zip(batch, self._decoder.resolve(pending, device), strict=True):
            if isinstance(row, InvalidImage):
                errors.append(ItemError(rec.source, "image", _reason(row)))
                continue
            rows.append(row)
            items.append({**_item(rec, with_text=rec.text is not None and bool(rec.text.strip())), "sha256": digest})
            thumbnails.append(thumb)
        if not rows:
            return
        pixels: Any
        if jpegs:  # decoded on the device: numpy rows of the other images join them there
            import torch

            rows = [torch.from_numpy(r).to(device) if isinstance(r, np.ndarray) else r.to(device) for r in rows]
            pixels = torch.stack(rows)
        else:  # CPU rows only: one batch, copied to the device once by the model
            pixels = np.stack(rows)
        vectors.append(self.model.encode_pixels(pixels))


def concat_vectors(parts: Sequence[np.ndarray], dim: int) -> np.ndarray:
    """The rows of `parts` as one float32 array; (0, dim) when there are none."""
    parts = [p for p in parts if len(p)]
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros((0, dim), np.float32)


def _merge(parts: list[ShardResult], dim: int) -> ShardResult:
    return ShardResult(
        image_vectors=concat_vectors([p.image_vectors for p in parts], dim),
        image_items=[i for p in parts for i in p.image_items],
        text_vectors=concat_vectors([p.text_vectors for p in parts], dim),
        text_items=[i for p in parts for i in p.text_items],
        errors=[e for p in parts for e in p.errors],
        records=sum(p.records for p in parts),
        thumbnails=[t for p in parts for t in p.thumbnails],
    )


def _item(rec: Record, *, with_text: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"id": rec.id, "metadata": rec.metadata}
    if with_text:
        item["text"] = rec.text
    return item
