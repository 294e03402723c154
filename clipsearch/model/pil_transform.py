"""open_clip's inference preprocessing (`open_clip.transform.image_transform_v2`, `is_train=False`)
in PIL and numpy, without torch: the same PIL resize and crop calls torchvision makes on a PIL
image, then to float32 and normalized as torchvision's ToTensor and Normalize do, so the
result equals open_clip's bit for bit (tests/model/test_pil_transform.py).

Resize modes: `shortest` (the default: the short side to the size, then a centre crop),
`squash` (both sides to the size) and `longest` (the long side to the size, then padded with
`fill_color`); interpolation bicubic or bilinear.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class PilTransform:
    """One PIL image -> float32 array (3, H, W), as open_clip's inference transform makes it."""

    def __init__(self, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bicubic", resize_mode: str = "shortest", fill_color: int = 0) -> None:
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))  # (h, w)
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.resample = _RESAMPLE.get(interpolation, Image.Resampling.BICUBIC)  # open_clip: random -> bicubic
        if resize_mode not in ("shortest", "squash", "longest"):
            raise ValueError(f"resize_mode {resize_mode!r} is not shortest, squash or longest")
        self.resize_mode = resize_mode
        self.fill_color = fill_color

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PilTransform:
        """From open_clip's preprocess config (`model.visual.preprocess_cfg`)."""
        return cls(cfg["size"], cfg["mean"], cfg["std"], cfg.get("interpolation") or "bicubic",
                   cfg.get("resize_mode") or "shortest", int(cfg.get("fill_color", 0) or 0))

    def __call__(self, image: Image.Image) -> np.ndarray:
        h, w = self.size
        if self.resize_mode == "squash":
            image = image.resize((w, h), self.resample)
        elif self.resize_mode == "longest":
            image = _crop_or_pad(_keep_ratio(image, self.size, 1.0, self.resample), self.size, self.fill_color)
        elif h == w:  # torchvision's Resize(int): the short side to the size
            image = _crop_or_pad(_short_side(image, h, self.resample), self.size, 0)
        else:
            image = _crop_or_pad(_keep_ratio(image, self.size, 0.0, self.resample), self.size, 0)
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = np.asarray(image, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1) / np.float32(255)
        return (pixels - self.mean) / self.std


def _short_side(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """torchvision's `resize(img, size)` for an int size: the short side to `size`."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), resample)


def _keep_ratio(image: Image.Image, size: tuple[int, int], longest: float,
                resample: Image.Resampling) -> Image.Image:
    """open_clip's ResizeKeepRatio (no random scale): the ratio between the short and the long side's."""
    h, w = image.size[1], image.size[0]
    ratio_h, ratio_w = h / size[0], w / size[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    new_h, new_w = round(h / ratio), round(w / ratio)
    return image.resize((new_w, new_h), resample)


def _crop_or_pad(image: Image.Image, size: tuple[int, int], fill: int) -> Image.Image:
    """torchvision's center_crop (padding with 0 first when the image is smaller), or open_clip's
    center_crop_or_pad with `fill`: the same arithmetic."""
    crop_h, crop_w = size
    w, h = image.size
    if crop_w > w or crop_h > h:
        left = (crop_w - w) // 2 if crop_w > w else 0
        top = (crop_h - h) // 2 if crop_h > h else 0
        right = (crop_w - w + 1) // 2 if crop_w > w else 0
        bottom = (crop_h - h + 1) // 2 if crop_h > h else 0
        image = _pad(image, (left, top, right, bottom), fill)
        w, h = image.size
        if (w, h) == (crop_w, crop_h):
            return image
    top = round((h - crop_h) / 2.0)
    left = round((w - crop_w) / 2.0)
    return image.crop((left, top, left + crop_w, top + crop_h))


def _pad(image: Image.Image, border: tuple[int, int, int, int], fill: int) -> Image.Image:
    """torchvision's constant pad of a PIL image: `fill` in every band, the palette kept for mode P."""
    bands = len(image.getbands())
    color: Any = tuple([int(fill)] * bands) if bands > 1 else int(fill)
    if image.mode == "F":
        color = float(fill)
    if image.mode == "P":
        palette = image.getpalette()
        padded = ImageOps.expand(image, border=border, fill=color)
        if palette is not None:
            padded.putpalette(palette)
        return padded
    return ImageOps.expand(image, border=border, fill=color)
