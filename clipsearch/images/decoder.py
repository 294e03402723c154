"""Image bytes -> model input: the one place that decides how (`ImageDecoder`), and the
torch path it can take: libjpeg-turbo (CPU) or nvJPEG (CUDA) decode, then resize /
center-crop / normalize as tensor ops on the same device (`TorchPreprocess`).
The service and the index builder both decode through `ImageDecoder`.

The torch path mirrors open_clip's inference transform (Resize(shorter side, bicubic,
antialias) -> CenterCrop -> RGB -> ToTensor -> Normalize) without PIL, so that on a GPU the
pixels never go through Python-level image objects. `TorchPreprocess.from_transform` reads
the parameters off the model's own transform and returns None for any other composition
(the caller then keeps PIL). Not bit-exact: torch's antialiased bicubic differs from PIL's
by about one grey level; tests/images/test_fast_images.py bounds the deviation.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize
from torchvision.transforms.v2 import functional as F

try:  # torchvision 0.29 deprecates its decoders in favour of TorchCodec; without them, PIL
    from torchvision.io import ImageReadMode, decode_jpeg

    HAVE_TORCH_DECODE = True
except ImportError:  # pragma: no cover - depends on the torchvision release
    HAVE_TORCH_DECODE = False

from clipsearch.core.errors import InvalidImage
from clipsearch.images.codec import base64_looks_like_jpeg, make_thumbnail, open_image, probe_image, thumbnail_of

JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


@dataclass(frozen=True)
class TorchPreprocess:
    size: int  # shorter side after resize
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_transform(cls, transform: Any) -> TorchPreprocess | None:
        """The torch equivalent of open_clip's standard inference transform, or None
        (also when this torchvision has no JPEG decoder)."""
        if not HAVE_TORCH_DECODE:
            return None
        steps = list(getattr(transform, "transforms", []))
        kinds = [type(t).__name__ for t in steps]
        if kinds != ["Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize"] and \
                kinds != ["Resize", "CenterCrop", "_convert_to_rgb", "ToTensor", "Normalize"]:
            return None
        resize, crop, _, _, norm = steps
        if not (isinstance(resize, Resize) and isinstance(crop, CenterCrop) and isinstance(norm, Normalize)):
            return None
        size = resize.size[0] if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1 else resize.size
        if not isinstance(size, int) or resize.interpolation != InterpolationMode.BICUBIC or resize.max_size:
            return None
        return cls(size=size, crop=(int(crop.size[0]), int(crop.size[1])),
                   mean=tuple(float(m) for m in norm.mean), std=tuple(float(s) for s in norm.std))

    def decode(self, jpegs: list[bytes], device: torch.device) -> list[torch.Tensor]:
        """JPEG bytes -> uint8 RGB CHW tensors on `device` (one batched nvJPEG call on CUDA).

        Raises RuntimeError on data the decoder rejects; callers fall back to PIL, which
        names the bad item.
        """
        raw = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated (TorchCodec)
            out = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        return list(out)

    def pixels(self, images: list[torch.Tensor], *, batched: bool | None = None) -> torch.Tensor:
        """uint8 RGB CHW images (any sizes, one device) -> a normalized (N, 3, H, W) batch.

        On a GPU, images of one size resize together (one set of kernel launches for a batch
        of same-sized photos); on the CPU one at a time, where torch's vectorised uint8
        resize is faster. The outputs are equal either way; `batched` overrides the choice."""
        if batched is None:
            batched = bool(images) and images[0].device.type != "cpu"
        groups: dict[Any, list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape) if batched else i, []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for rows in groups.values():
            same = images[rows[0]][None] if len(rows) == 1 else torch.stack([images[i] for i in rows])
            resized = F.resize(same, [self.size], interpolation=InterpolationMode.BICUBIC, antialias=True)
            for i, row in zip(rows, F.center_crop(resized, list(self.crop)), strict=True):
                out[i] = row
        batch = torch.stack(out).to(torch.float32).div_(255.0)  # type: ignore[arg-type]
        mean, std = _normalization(self.mean, self.std, batch.device)
        return batch.sub_(mean).div_(std)


@functools.lru_cache(maxsize=16)
def _normalization(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, C, 1, 1) tensors on `device`, made once: building them per batch
    is a blocking host-to-device copy on a GPU, which would wait for the model's batch."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1),
            torch.tensor(std, device=device).view(1, -1, 1, 1))


_CPU = torch.device("cpu")


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
    device: torch.device = _CPU  # where the model (and the torch path) runs
    jpegs_per_batch: bool = False  # JPEGs decode a batch at a time (nvJPEG), not per request

    @classmethod
    def create(cls, transform: Any, mode: str, image_size: tuple[int, int], max_pixels: int, *,
               exif: bool = False, device: torch.device | str = "cpu") -> ImageDecoder:
        if mode not in ("exact", "draft", "torch"):
            raise ValueError(f"image decode must be exact, draft or torch, not {mode!r}")
        torch_path = TorchPreprocess.from_transform(transform) if mode == "torch" else None
        device = torch.device(device)
        per_batch = torch_path is not None and device.type == "cuda"
        return cls(transform, mode, image_size, max_pixels, torch_path, exif, device, per_batch)

    def prepares_cheaply(self, images: Sequence[str | bytes]) -> bool:
        """Whether `prepare` of these images (base64, or bytes) is only a header check (JPEGs
        for a batch decode): cheaper than a hop through a thread pool."""
        return self.jpegs_per_batch and all(
            is_jpeg(image) if isinstance(image, bytes) else base64_looks_like_jpeg(image) for image in images)

    def prepare(self, raws: list[bytes], names: list[str]) -> list[torch.Tensor | Jpeg]:
        """Per request: each image checked (format, pixel limits; errors name the item) and
        decoded to model input on the CPU, or, for a batch decode, left as a checked `Jpeg`."""
        items = self.split(raws, names)
        if self.jpegs_per_batch:
            return items
        return [self._raise(item) for item in self.resolve(items, _CPU)]

    def collate(self, requests: list[list[torch.Tensor | Jpeg]]) -> tuple[torch.Tensor, dict[int, InvalidImage]]:
        """Per batch: every request's model input as one (N, 3, H, W) tensor for `device`
        (JPEGs decoded in one call; on a GPU, rows from the CPU gathered page-locked, so the
        copy is asynchronous), and the requests whose image failed to decode, by position
        (their rows are placeholders)."""
        flat = [item for items in requests for item in items]
        tensors = [item for item in flat if not isinstance(item, Jpeg)]
        if len(tensors) == len(flat):
            return gather_rows(tensors, self.device), {}
        failed: dict[int, InvalidImage] = {}
        resolved = iter(self.resolve(flat, self.device))
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
    def _raise(item: torch.Tensor | InvalidImage) -> torch.Tensor:
        if isinstance(item, InvalidImage):
            raise item
        return item

    def _pil(self, raw: bytes, name: str) -> torch.Tensor:
        """open_clip's own transform on a PIL decode (at a reduced scale in draft mode)."""
        return self._transform(self._open(raw, name), name)

    def _open(self, raw: bytes, name: str) -> Any:
        draft = self.image_size if self.mode == "draft" else None
        return open_image(raw, field=name, max_pixels=self.max_pixels, draft=draft, exif=self.exif)

    def _transform(self, image: Any, name: str) -> torch.Tensor:
        try:
            return self.transform(image)
        except Exception as exc:  # an odd mode or palette PIL decodes but cannot convert
            raise InvalidImage(f"{name}: cannot convert image ({type(exc).__name__})", field=name) from None

    def pixels_and_thumbnail(self, raw: bytes, name: str) -> tuple[torch.Tensor | Jpeg, bytes]:
        """`split` of one image, and its thumbnail (`images.thumbnail_of`): from the same decode
        on the PIL path; from a decode of its own, at a reduced scale, for a JPEG left to the
        torch path."""
        if self.torch_path is not None and is_jpeg(raw):
            return self.split([raw], [name])[0], make_thumbnail(raw, max_pixels=self.max_pixels)
        image = self._open(raw, name)
        return self._transform(image, name), thumbnail_of(image)

    def split(self, raws: list[bytes], names: list[str]) -> list[torch.Tensor | Jpeg]:
        """Per item: the model input on the CPU (PIL path), or a `Jpeg` left for `decode_jpegs`
        (torch path). Headers are checked (format, pixel limits) before any torch decoder sees
        them; errors name the item."""
        out: list[torch.Tensor | Jpeg] = []
        for raw, name in zip(raws, names, strict=True):
            if self.torch_path is not None and is_jpeg(raw):
                fmt, _, orientation = probe_image(raw, field=name, max_pixels=self.max_pixels, exif=self.exif)
                if fmt == "JPEG":
                    out.append(Jpeg(name, raw, orientation))
                    continue
            out.append(self._pil(raw, name))
        return out

    def decode_jpegs(self, jpegs: list[Jpeg], device: torch.device) -> list[torch.Tensor | InvalidImage]:
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
            decoded = tp.decode([j.data for j in jpegs], device)
            return list(tp.pixels([upright(t, j.orientation) for t, j in zip(decoded, jpegs, strict=True)]))
        except Exception:  # whatever the decoder rejects: retried below, and PIL names the bad one
            if len(jpegs) > 1:
                return [r for j in jpegs for r in self.decode_jpegs([j], device)]
        try:
            return [self._pil(jpegs[0].data, jpegs[0].name)]
        except InvalidImage as exc:
            return [exc]

    def resolve(self, items: list[torch.Tensor | Jpeg], device: torch.device) -> list[torch.Tensor | InvalidImage]:
        """`split` output with every JPEG decoded, all in one decoder call."""
        decoded = iter(self.decode_jpegs([it for it in items if isinstance(it, Jpeg)], device))
        return [next(decoded) if isinstance(it, Jpeg) else it for it in items]

    def pixels(self, raws: list[bytes], names: list[str], device: torch.device) -> torch.Tensor:
        """A (N, 3, H, W) float batch, in input order; errors name the item. On `device`
        when the torch path ran there (nvJPEG: one call for all JPEGs), else on the CPU."""
        tensors = [self._raise(item) for item in self.resolve(self.split(raws, names), device)]
        on = next((t.device for t in tensors if t.device.type != "cpu"), None)
        return torch.stack([t if on is None else t.to(on) for t in tensors])


def gather_rows(rows: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(3, H, W) rows as one (N, 3, H, W) tensor for a model on `device`: on the CPU as they
    are; for a GPU, page-locked when all rows are on the CPU (so the copy to it is
    asynchronous), else on it."""
    if any(t.device.type != "cpu" for t in rows):
        return torch.stack([t.to(device) for t in rows])
    if device.type != "cuda":
        return torch.stack(rows)
    out = torch.empty((len(rows), *rows[0].shape), dtype=rows[0].dtype, pin_memory=True)
    return torch.stack(rows, out=out)


@dataclass(frozen=True)
class Jpeg:
    """A JPEG whose header passed the checks, waiting for a batched torch decode."""

    name: str
    data: bytes
    orientation: int = 1  # EXIF orientation to undo after decoding (1: none, or not asked for)


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image as stored -> as its EXIF orientation says to show it; the same
    turns as PIL's `ImageOps.exif_transpose`, as tensor ops on any device (torchvision
    applies EXIF orientation on the CPU only)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return torch.rot90(image, 2, (-2, -1)).transpose(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image
