"""A transformers-family model's tokenizer and image processor without transformers (and so
without torch), for exports: the tokenizer from its `tokenizer.json` on the `tokenizers`
library, the image processor as transformers' PIL backend computes it, in PIL and numpy.

`clipsearch export` describes both in the export's manifest (`describe_tokenizer`,
`describe_processor`) and checks, on probe texts and images, that these give what the
transformers objects give (ids equal, pixels equal); where they do not (an option this module
does not reproduce), the export keeps the transformers files and says that serving it needs
transformers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipsearch.model.base import PAD
from clipsearch.model.bpe import clean

# transformers' `clean_up_tokenization` (tokenization_utils_base.py)
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class _Inner:
    """The slice of a transformers tokenizer that `base.TextSide.text_of_ids` reads."""

    def __init__(self, tokenizer: Any, options: Mapping[str, Any]) -> None:
        self._tok = tokenizer
        self.all_special_ids = sorted(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        self._suffix = options.get("end_of_word_suffix")
        self._cleanup = bool(options.get("clean_up_tokenization_spaces"))

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=False)
        if self._suffix:  # CLIPTokenizer's decode: the end-of-word suffix becomes a space
            text = text.replace(self._suffix, " ").strip()
        if self._cleanup:
            for before, after in _CLEANUP:
                text = text.replace(before, after)
        return text

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}


class PortableTokenizer:
    """Texts -> ids (n, context_length) from a `tokenizer.json`, as transformers' tokenizer gives
    them with `padding="max_length", truncation=True, max_length=context_length`.

    `mode` "transformers": padding holds `PAD` (clip's `hf.TextTokenizer`); "open_clip": the
    padding keeps the pad token's id, texts are cleaned first and the separator may become 0
    (open_clip's `HFTokenizer`)."""

    def __init__(self, path: str | Path, context_length: int, options: Mapping[str, Any]) -> None:
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(path))
        plain = tokenizers.Tokenizer.from_file(str(path))
        plain.no_padding()  # the file may hold a padding and a truncation setting
        plain.no_truncation()
        self.tokenizer = _Inner(plain, options)
        self.context_length = context_length
        self.mode = str(options.get("mode", "transformers"))
        self.clean = options.get("clean")  # open_clip: "whitespace" or "lower"
        self.sep_id = options.get("strip_sep_id")
        tok.enable_truncation(max_length=context_length, direction=options.get("truncation_side", "right"))
        tok.enable_padding(length=context_length, direction=options.get("padding_side", "right"),
                           pad_id=int(options.get("pad_id", 0)), pad_token=str(options.get("pad_token", "[PAD]")))
        self._tok = tok

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if self.clean is not None:
            texts = [clean(t, lower=self.clean == "lower") for t in texts]
        encoded = self._tok.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64).reshape(len(texts), self.context_length)
        if self.mode == "open_clip":
            if self.sep_id is not None:
                ids[ids == int(self.sep_id)] = 0
            return ids
        mask = np.array([e.attention_mask for e in encoded], dtype=bool).reshape(ids.shape)
        ids[~mask] = PAD
        return ids


def describe_tokenizer(tokenizer: Any, open_clip_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """What `PortableTokenizer` needs of a transformers tokenizer, or None where it has no
    `tokenizers` form (a slow, sentencepiece-only tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    options: dict[str, Any] = {
        "mode": "transformers", "padding_side": getattr(tokenizer, "padding_side", "right"),
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
        "pad_id": int(tokenizer.pad_token_id or 0), "pad_token": str(tokenizer.pad_token or "[PAD]"),
        "clean_up_tokenization_spaces": bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
        "end_of_word_suffix": None}
    if type(tokenizer).__name__.startswith("CLIPTokenizer"):
        options["end_of_word_suffix"] = getattr(backend.model, "end_of_word_suffix", None)
    if open_clip_options is not None:
        if open_clip_options.get("clean") not in ("whitespace", "lower"):
            return None
        options.update(mode="open_clip", clean=open_clip_options["clean"],
                       strip_sep_id=tokenizer.sep_token_id if open_clip_options.get("strip_sep_token") else None)
    return options


class ProcessorTransform:
    """One PIL image -> float32 (3, H, W), as transformers' PIL-backend image processor makes it
    (`image_processing_backends.PilBackend`): converted to RGB, resized with PIL (the short side
    to `shortest_edge`, or to height x width), centre-cropped (padded with 0 when smaller),
    rescaled in float64 then float32, normalized."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.resize = cfg.get("resize")  # {"shortest_edge": n} | {"height": h, "width": w} | None
        self.resample = Image.Resampling(int(cfg.get("resample", Image.Resampling.BICUBIC)))
        self.crop = tuple(cfg["crop"]) if cfg.get("crop") else None  # (h, w)
        self.rescale = cfg.get("rescale")
        self.mean = np.asarray(cfg["mean"], np.float32) if cfg.get("mean") is not None else None
        self.std = np.asarray(cfg["std"], np.float32) if cfg.get("std") is not None else None

    def __call__(self, image: Image.Image) -> np.ndarray:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.resize:
            image = image.resize(self._size(image), self.resample, reducing_gap=None)
        pixels: np.ndarray = np.asarray(image)
        if self.crop:
            pixels = _center_crop(pixels, self.crop)
        if self.rescale is not None:
            pixels = (pixels.astype(np.float64) * float(self.rescale)).astype(np.float32)
        if self.mean is not None and self.std is not None:
            pixels = (pixels.astype(np.float32, copy=False) - self.mean) / self.std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)

    def _size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) to resize to: transformers' `get_resize_output_image_size`."""
        resize = self.resize or {}
        if "shortest_edge" in resize:
            size = int(resize["shortest_edge"])
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = size, int(size * long / short)
            return (new_short, new_long) if w <= h else (new_long, new_short)
        return int(resize["width"]), int(resize["height"])


def _center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """transformers' `image_transforms.center_crop` on (H, W, C)."""
    h, w = pixels.shape[:2]
    ch, cw = size
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((nh, nw, pixels.shape[2]), pixels.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded[tp : tp + h, lp : lp + w] = pixels
    top, left = top + tp, left + lp
    return padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


def describe_processor(processor: Any) -> dict[str, Any] | None:
    """What `ProcessorTransform` needs of a transformers image processor, or None where it uses
    an option this module does not reproduce."""
    def get(name: str, default: Any = None) -> Any:
        return getattr(processor, name, default)

    if get("do_pad") or get("do_reduce_labels") or get("do_flip_channel_order"):
        return None
    size = dict(get("size") or {}) if get("do_resize") else None
    if size is not None:
        size = {k: v for k, v in size.items() if v is not None}
        if set(size) not in ({"shortest_edge"}, {"height", "width"}):
            return None
    crop = get("crop_size") if get("do_center_crop") else None
    crop = dict(crop) if crop else None
    if crop is not None and not {"height", "width"} <= set(crop):
        return None
    resample = get("resample")
    return {"kind": "transformers", "resize": size,
            "resample": int(resample) if resample is not None else int(Image.Resampling.BILINEAR),
            "crop": [int(crop["height"]), int(crop["width"])] if crop else None,
            "rescale": float(get("rescale_factor")) if get("do_rescale") else None,
            "mean": [float(x) for x in np.atleast_1d(get("image_mean"))] if get("do_normalize") else None,
            "std": [float(x) for x in np.atleast_1d(get("image_std"))] if get("do_normalize") else None}
