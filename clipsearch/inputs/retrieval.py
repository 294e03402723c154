"""The standard retrieval test sets' layouts, read into images, texts and their true pairs:

- Karpathy's split JSON (Flickr30k, COCO; `dataset_flickr30k.json`): `{"images": [{"filename",
  "filepath"?, "split", "sentences": [{"raw"}, ...]}]}` with the image files in a folder; each
  image has several captions, each caption one image.
- Chinese-CLIP's and MUGE's: texts as JSONL (`{"text_id", "text", "image_ids": [...]}`) and
  images as TSV (`id<TAB>base64`).

Images are loaded when encoded (`RetrievalSet.image`), not all at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipsearch.images.codec import open_image
from clipsearch.inputs.pairs import MAX_IMAGE_PIXELS, decode_offline_image
from clipsearch.inputs.readers import InputError


@dataclass
class RetrievalSet:
    """Images (each a name and a loader of its PIL image), texts, and (image, text) true pairs."""

    images: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)

    def image(self, i: int) -> Any:
        return self.images[i][1]()


def read_karpathy(path: str | Path, images_dir: str | Path, split: str = "test") -> RetrievalSet:
    """One split of a Karpathy JSON; image files under `images_dir` (its `filepath`, if any, then `filename`)."""
    path, root = Path(path), Path(images_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = [e for e in data["images"] if e.get("split") == split]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a Karpathy split file ({exc})") from None
    if not entries:
        raise InputError(f"{path}: no image in split {split!r}")
    out = RetrievalSet()
    for entry in entries:
        file = root / entry.get("filepath", "") / entry["filename"]
        if not file.is_file():
            raise InputError(f"{path}: {entry['filename']}: no file {file}")
        image = len(out.images)
        out.images.append((str(file), _file_loader(file)))
        for sentence in entry.get("sentences", []):
            text = sentence.get("raw") or " ".join(sentence.get("tokens", []))
            out.pairs.append((image, len(out.texts)))
            out.texts.append(text)
    return out


def read_muge(texts_path: str | Path, images_path: str | Path) -> RetrievalSet:
    """Chinese-CLIP/MUGE's test files: texts JSONL with `image_ids`, images TSV of `id<TAB>base64`."""
    texts_path, images_path = Path(texts_path), Path(images_path)
    out = RetrievalSet()
    rows: dict[str, int] = {}
    try:
        with open(images_path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                image_id, sep, b64 = line.rstrip("\n").partition("\t")
                if not sep:
                    raise InputError(f"{images_path}:{line_no}: expected id<TAB>base64")
                rows[image_id.strip()] = len(out.images)
                out.images.append((f"{images_path.name}:{line_no}", _b64_loader(b64.strip(), image_id.strip())))
        with open(texts_path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                item = json.loads(line)
                for image_id in item["image_ids"]:
                    if str(image_id) not in rows:
                        raise InputError(f"{texts_path}:{line_no}: image {image_id} is not in {images_path.name}")
                    out.pairs.append((rows[str(image_id)], len(out.texts)))
                out.texts.append(str(item["text"]))
    except OSError as exc:
        raise InputError(f"{exc.filename}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{texts_path}: not Chinese-CLIP's texts JSONL ({exc})") from None
    return out


def _file_loader(file: Path) -> Callable[[], Any]:
    return lambda: open_image(file.read_bytes(), field=str(file), max_pixels=MAX_IMAGE_PIXELS)


def _b64_loader(b64: str, name: str) -> Callable[[], Any]:
    return lambda: decode_offline_image(b64, field=f"image {name}")
