"""Image bytes -> model input: the one place that decides how (`ImageDecoder`). The service and
the index builder both decode through it.

The PIL path needs no torch: the model's own transform gives a torch tensor (a torch model)
or a numpy array (an export), and rows are stacked as what they are. The torch path
(`torch_path`: nvJPEG / libjpeg-turbo and tensor ops) loads only when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.core.errors import InvalidImage
from clipsearch.images.codec import base64_looks_like_jpeg, make_thumbnail, open_image, probe_image, thumbnail_of

if TYPE_CHECKING:
    from clipsearch.images.torch_path import TorchPreprocess

JPEG_MAGIC = b"\xff\xd8\xff"
CPU = "cpu"


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


@dataclass(frozen=True)
class ImageDecoder:
    """Image bytes -> model input, by `mode`:

    - exact: open_clip's own transform on a full PIL decode (bit for bit);
    - draft: PIL decodes JPEGs at the smallest DCT scale covering `image_size`;
    - torch: JPEGs through `TorchPreprocess` on `device`; other formats, and models whose
      transform is not open_clip's standard one, stay exact.

    Where JPEGs decode is decided here too: on a GPU with the torch path, all JPEGs of a
    batch in one nvJPEG call (`collate`), their headers checked per request (`prepare`);
    everywhere else each request's images decode fully in `prepare`.

    Picklable, so that the index builder's worker processes decode exactly as the service.
    """

    transform: Any
    mode: str
    image_size: tuple[int, int]
    max_pixels: int
    torch_path: TorchPreprocess | None
    exif: bool = False  # turn images upright by their EXIF orientation first
    device: Any = CPU  # where the model (and the torch path) runs: a torch.device, or "cpu"
    jpegs_per_batch: bool = False  # JPEGs decode a batch at a time (nvJPEG), not per request

    @classmethod
    def create(cls, transform: Any, mode: str, image_size: tuple[int, int], max_pixels: int, *,
               exif: bool = False, device: Any = CPU) -> ImageDecoder:
        if mode not in ("exact", "draft", "torch"):
            raise ValueError(f"image decode must be exact, draft or torch, not {mode!r}")
        torch_path = None
        if mode == "torch":
            try:
                from clipsearch.images.torch_path import TorchPreprocess
            except ImportError:  # no torch here (an export served without it): PIL decodes
                pass
            else:
                torch_path = TorchPreprocess.from_transform(transform)
                device = _torch_device(device)
        per_batch = torch_path is not None and _device_type(device) == "cuda"
        return cls(transform, mode, image_size, max_pixels, torch_path, exif, device, per_batch)

    def prepares_cheaply(self, images: Sequence[str | bytes]) -> bool:
        """Whether `prepare` of these images (base64, or bytes) is only a header check (JPEGs
        for a batch decode): cheaper than a hop through a thread pool."""
        return self.jpegs_per_batch and all(
            is_jpeg(image) if isinstance(image, bytes) else base64_looks_like_jpeg(image) for image in images)

    def prepare(self, raws: list[bytes], names: list[str]) -> list[Any]:
        """Per request: each image checked (format, pixel limits; errors name the item) and
        decoded to model input on the CPU, or, for a batch decode, left as a checked `Jpeg`."""
        items = self.split(raws, names)
        if self.jpegs_per_batch:
            return items
        return [self._raise(item) for item in self.resolve(items, CPU)]

    def collate(self, requests: list[list[Any]]) -> tuple[Any, dict[int, InvalidImage]]:
        """Per batch: every request's model input as one (N, 3, H, W) tensor for `device`
        (JPEGs decoded in one call; on a GPU, rows from the CPU gathered page-locked, so the
        copy is asynchronous), and the requests whose image failed to decode, by position
        (their rows are placeholders)."""
        flat = [item for items in requests for item in items]
        tensors = [item for item in flat if not isinstance(item, Jpeg)]
        if len(tensors) == len(flat):
            return stack_rows(tensors, self.device), {}
        failed: dict[int, InvalidImage] = {}
        resolved = iter(self.resolve(flat, self.device))
        import torch  # JPEGs left for a batch decode: the torch path, so torch is here

        placeholder = torch.zeros((3, *self.image_size), device=self.device)
        rows: list[torch.Tensor] = []
        for i, items in enumerate(requests):
            for _ in items:
                item = next(resolved)
                if isinstance(item, InvalidImage):
                    failed.setdefault(i, item)
                    item = placeholder
                rows.append(item.to(self.device))
        return torch.stack(rows), failed

    @staticmethod
    def _raise(item: Any) -> Any:
        if isinstance(item, InvalidImage):
            raise item
        return item

    def _pil(self, raw: bytes, name: str) -> Any:
        """open_clip's own transform on a PIL decode (at a reduced scale in draft mode)."""
        return self._transform(self._open(raw, name), name)

    def _open(self, raw: bytes, name: str) -> Any:
        draft = self.image_size if self.mode == "draft" else None
        return open_image(raw, field=name, max_pixels=self.max_pixels, draft=draft, exif=self.exif)

    def _transform(self, image: Any, name: str) -> Any:
        try:
            return self.transform(image)
        except Exception as exc:  # an odd mode or palette PIL decodes but cannot convert
            raise InvalidImage(f"{name}: cannot convert image ({type(exc).__name__})", field=name) from None

    def pixels_and_thumbnail(self, raw: bytes, name: str) -> tuple[Any, bytes]:
        """`split` of one image, and its thumbnail (`images.thumbnail_of`): from the same decode
        on the PIL path; from a decode of its own, at a reduced scale, for a JPEG left to the
        torch path."""
        if self.torch_path is not None and is_jpeg(raw):
            return self.split([raw], [name])[0], make_thumbnail(raw, max_pixels=self.max_pixels)
        image = self._open(raw, name)
        return self._transform(image, name), thumbnail_of(image)

    def split(self, raws: list[bytes], names: list[str]) -> list[Any]:
        """Per item: the model input on the CPU (PIL path), or a `Jpeg` left for `decode_jpegs`
        (torch path). Headers are checked (format, pixel limits) before any torch decoder sees
        them; errors name the item."""
        out: list[Any] = []
        for raw, name in zip(raws, names, strict=True):
            if self.torch_path is not None and is_jpeg(raw):
                fmt, _, orientation = probe_image(raw, field=name, max_pixels=self.max_pixels, exif=self.exif)
                if fmt == "JPEG":
                    out.append(Jpeg(name, raw, orientation))
                    continue
            out.append(self._pil(raw, name))
        return out

    def decode_jpegs(self, jpegs: list[Jpeg], device: Any) -> list[Any]:
        """Model inputs on `device`, one per JPEG, in one decoder call (nvJPEG batches on CUDA).

        If the decoder rejects the batch, each JPEG is retried alone, then through PIL, which
        decodes it or names it: one bad image costs its own request, not its batch-mates'.
        """
        tp = self.torch_path
        if not jpegs:
            return []
        if tp is None:
            raise ValueError("decode_jpegs needs the torch path")
        try:
            from clipsearch.images.torch_path import upright

            decoded = tp.decode([j.data for j in jpegs], device)
            return list(tp.pixels([upright(t, j.orientation) for t, j in zip(decoded, jpegs, strict=True)]))
        except Exception:  # whatever the decoder rejects: retried below, and PIL names the bad one
            if len(jpegs) > 1:
                return [r for j in jpegs for r in self.decode_jpegs([j], device)]
        try:
            return [self._pil(jpegs[0].data, jpegs[0].name)]
        except InvalidImage as exc:
            return [exc]

    def resolve(self, items: list[Any], device: Any) -> list[Any]:
        """`split` output with every JPEG decoded, all in one decoder call."""
        decoded = iter(self.decode_jpegs([it for it in items if isinstance(it, Jpeg)], device))
        return [next(decoded) if isinstance(it, Jpeg) else it for it in items]

    def pixels(self, raws: list[bytes], names: list[str], device: Any) -> Any:
        """A (N, 3, H, W) float batch, in input order; errors name the item. On `device`
        when the torch path ran there (nvJPEG: one call for all JPEGs), else on the CPU."""
        rows = [self._raise(item) for item in self.resolve(self.split(raws, names), device)]
        return stack_rows(rows, device)


def _device_type(device: Any) -> str:
    return str(getattr(device, "type", device)).split(":")[0]


def _torch_device(device: Any) -> Any:
    import torch

    return torch.device(str(device))


def stack_rows(rows: list[Any], device: Any) -> Any:
    """(3, H, W) rows as one (N, 3, H, W) batch: numpy rows (an export's preprocessing) with
    numpy; tensors with `torch_path.gather_rows`, page-locked for a GPU."""
    if isinstance(rows[0], np.ndarray):
        return np.stack(rows)
    from clipsearch.images.torch_path import gather_rows

    return gather_rows(rows, _torch_device(device))


@dataclass(frozen=True)
class Jpeg:
    """A JPEG whose header passed the checks, waiting for a batched torch decode."""

    name: str
    data: bytes
    orientation: int = 1  # EXIF orientation to undo after decoding (1: none, or not asked for)
