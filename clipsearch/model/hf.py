"""Hugging Face transformers CLIP-family models, as the model seam sees them.

`clipsearch.model.clip` is still the one place that loads a model; for a transformers
checkpoint it calls `load` here, which wraps `CLIPModel`, `ChineseCLIPModel` or
`SiglipModel` so that it looks like an open_clip model to the rest of clipsearch
(`encode_text`, `encode_image`, `logit_scale`, `logit_bias`, `visual`), with the
family's own tokenizer and image processor in front of it.

Token ids travel as one (n, context_length) int64 tensor, as open_clip's do; positions
the tokenizer's attention mask leaves out hold `PAD` (-1), so the mask rides along with
the ids and a batch can be cut to its longest text without losing it. CLIP and
Chinese-CLIP pass that mask to the model (so trimming is exact); SigLIP was trained on
texts padded to full length with no mask, so it gets its pad id back at every padded
position and is never trimmed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from clipsearch.core.errors import ModelLoadError
from clipsearch.core.fsutil import atomic_dir, sha256_file
from clipsearch.model.base import PAD

PREFIX = "hf:"
# transformers' model_type -> the class that holds both towers.
FAMILIES = {"clip": "CLIPModel", "chinese_clip": "ChineseCLIPModel", "siglip": "SiglipModel"}
MAX_CONTEXT = 512
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


def is_transformers_dir(directory: Path) -> bool:
    """A directory holding a transformers checkpoint of a family served here."""
    config = directory / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in FAMILIES
    except (OSError, ValueError):
        return False


def fingerprint(source: str, config: Any) -> str:
    """Weights' identity: a hash of the weight files of a local directory, the hub commit otherwise."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted({p for pat in _WEIGHTS for p in path.glob(pat)})
        if not files:
            raise ModelLoadError(f"{source}: no weights file ({', '.join(_WEIGHTS)})")
        if len(files) == 1:
            return "sha256:" + sha256_file(files[0])
        digest = hashlib.sha256("".join(f"{p.name}:{sha256_file(p)}\n" for p in files).encode()).hexdigest()
        return "sha256:" + digest
    commit = getattr(config, "_commit_hash", None)
    return f"{PREFIX}{source}@{commit}" if commit else f"{PREFIX}{source}"


class HFClip(torch.nn.Module):
    """A transformers dual encoder with open_clip's surface."""

    def __init__(self, model: Any, family: str, pad_token_id: int | None) -> None:
        super().__init__()
        self.hf = model
        self.family = family
        # What the tokenizer pads with: SigLIP sees it at every padded position.
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else
                                getattr(model.config.text_config, "pad_token_id", None) or 0)
        self.uses_mask = family != "siglip"
        vision = model.config.vision_config
        size = vision.image_size
        self.image_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def logit_scale(self) -> torch.nn.Parameter:
        return self.hf.logit_scale

    @property
    def logit_bias(self) -> torch.nn.Parameter | None:
        return getattr(self.hf, "logit_bias", None)

    @property
    def visual(self) -> torch.nn.ModuleList:
        """The image tower and its projection (what `--freeze-vision` freezes)."""
        parts = [self.hf.vision_model]
        if getattr(self.hf, "visual_projection", None) is not None:
            parts.append(self.hf.visual_projection)
        return torch.nn.ModuleList(parts)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens != PAD
        ids = tokens.masked_fill(~mask, self.pad_token_id)
        if self.uses_mask:
            out = self.hf.get_text_features(input_ids=ids, attention_mask=mask.long())
        else:
            out = self.hf.get_text_features(input_ids=ids)
        return _features(out)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.hf.get_image_features(pixel_values=pixels))


def _features(out: Any) -> torch.Tensor:
    # transformers 4 returns the projected tensor; 5 may return an output object holding it.
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected output {type(out).__name__} from a transformers feature call")
    return pooled


class TextTokenizer:
    """The family's tokenizer, padded to `context_length`, with `PAD` where its mask is 0."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt")
        ids = enc["input_ids"].long()
        mask = enc.get("attention_mask")
        return ids if mask is None else ids.masked_fill(mask == 0, PAD)


class ImageTransform:
    """The family's own image processor on one PIL image: (3, H, W) float32."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def context_length(tokenizer: Any, config: Any) -> int:
    """Texts are padded (and cut) to the text tower's positions, or the tokenizer's limit if lower."""
    limit = int(getattr(config.text_config, "max_position_embeddings", 0) or MAX_CONTEXT)
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < limit:
        limit = declared
    return min(limit, MAX_CONTEXT)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelLoadError("transformers checkpoints need the transformers package: "
                             "pip install 'clipsearch[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load(source: str) -> tuple[HFClip, ImageTransform, TextTokenizer, str]:
    """(model on the CPU in fp32, image transform, tokenizer, fingerprint) for a hub id or directory."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except Exception as exc:  # hub, cache and parse errors all mean "no such checkpoint here"
        raise ModelLoadError(f"{PREFIX}{source}: cannot read its config: {exc}") from exc
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ModelLoadError(f"{PREFIX}{source}: model_type {family!r} is not one of {', '.join(FAMILIES)}")
    try:
        cls = getattr(transformers, FAMILIES[family])
        model = cls.from_pretrained(source, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        processor = transformers.AutoImageProcessor.from_pretrained(source)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {PREFIX}{source}: {exc}") from exc
    wrapped = HFClip(model.eval(), family, tokenizer.pad_token_id)
    text = TextTokenizer(tokenizer, context_length(tokenizer, config))
    return wrapped, ImageTransform(processor), text, fingerprint(source, config)


def save(model: HFClip, tokenizer: TextTokenizer, transform: ImageTransform, directory: str | os.PathLike[str],
         extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a transformers checkpoint (weights, config, tokenizer, image processor), atomically."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        model.hf.save_pretrained(tmp, safe_serialization=True)
        tokenizer.tokenizer.save_pretrained(tmp)
        transform.processor.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return directory
