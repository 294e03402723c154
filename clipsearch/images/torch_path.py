"""The torch path of image decoding: libjpeg-turbo (CPU) or nvJPEG (CUDA) decode, then resize /
center-crop / normalize as tensor ops on the same device (`TorchPreprocess`).

It mirrors open_clip's inference transform (Resize(shorter side, bicubic, antialias) ->
CenterCrop -> RGB -> ToTensor -> Normalize) without PIL, so that on a GPU the pixels never go
through Python-level image objects. `TorchPreprocess.from_transform` reads the parameters off
the model's own transform and returns None for any other composition (the caller then keeps
PIL). Not bit-exact: torch's antialiased bicubic differs from PIL's by about one grey level;
tests/images/test_fast_images.py bounds the deviation. Only `decoder.ImageDecoder` imports
this module, and only when torch is there to use.
"""

from __future__ import annotations

import functools
import warnings
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
