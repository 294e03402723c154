"""JPEG -> model input in torch: libjpeg-turbo (CPU) or nvJPEG (CUDA) decode, then
resize / center-crop / normalize as tensor ops on the same device.

This mirrors open_clip's inference transform (Resize(shorter side, bicubic, antialias)
-> CenterCrop -> RGB -> ToTensor -> Normalize) without PIL, so that on a GPU the pixels
never go through Python-level image objects. `TorchPreprocess.from_transform` reads the
parameters off the model's own transform and returns None for any other composition
(the caller then keeps PIL). Not bit-exact: torch's antialiased bicubic differs from
PIL's by about one grey level; tests/service/test_torch_preprocess.py bounds the
deviation (model input and embedding) against open_clip's PIL path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize
from torchvision.transforms.v2 import functional as F

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
        """The torch equivalent of open_clip's standard inference transform, or None."""
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

    def pixels(self, images: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 RGB CHW images (any sizes, one device) -> a normalized (N, 3, H, W) batch."""
        out = []
        for image in images:
            resized = F.resize(image, [self.size], interpolation=InterpolationMode.BICUBIC, antialias=True)
            out.append(F.center_crop(resized, list(self.crop)))
        batch = torch.stack(out).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1)
        return batch.sub_(mean).div_(std).to(dtype)
