"""Training and evaluation data: EasyNLP TSV pairs, read lazily by line offset."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipsearch.core.errors import ClipsearchError
from clipsearch.core.images import decode_image
from index_builder.readers import InputError, parse_schema

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 100_000_000


@dataclass
class PairRow:
    line: int
    id: str
    text: str
    image_b64: str


class PairFile:
    """The pair rows of a TSV (text + image, optional id), held as byte offsets, not strings."""

    def __init__(self, path: str | Path, schema: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path} does not exist")
        self.columns = parse_schema(schema) if schema else None
        self.offsets: list[tuple[int, int]] = []  # (byte offset, line number)
        self.skipped: list[tuple[int, str]] = []
        with open(self.path, "rb") as f:
            offset = 0
            for line_no, raw in enumerate(f, start=1):
                if raw.strip():
                    cols = self._columns(len(raw.rstrip(b"\r\n").split(b"\t")))
                    if cols is None:
                        self.skipped.append((line_no, "wrong number of columns"))
                    else:
                        self.offsets.append((offset, line_no))
                offset += len(raw)
        if not self.offsets:
            raise InputError(f"{self.path}: no text<TAB>image rows")

    def _columns(self, n: int) -> list[str] | None:
        if self.columns is not None:
            return self.columns if n == len(self.columns) else None
        return {2: ["text", "image"], 3: ["id", "text", "image"]}.get(n)

    def __len__(self) -> int:
        return len(self.offsets)

    def row(self, i: int) -> PairRow:
        offset, line_no = self.offsets[i]
        with open(self.path, "rb") as f:
            f.seek(offset)
            raw = f.readline().decode("utf-8", errors="replace").rstrip("\r\n")
        cols = raw.split("\t")
        names = self._columns(len(cols)) or []
        values = dict(zip(names, cols, strict=False))
        return PairRow(line_no, values.get("id") or str(line_no), values.get("text", ""), values.get("image", ""))


class PairDataset(torch.utils.data.Dataset):
    """(pixels, tokens) per row; a row whose image does not decode yields None (dropped by `collate`)."""

    def __init__(self, pairs: PairFile, transform: Any, tokenizer: Any) -> None:
        self.pairs = pairs
        self.transform = transform
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        row = self.pairs.row(i)
        if not row.text.strip():
            return None
        try:
            image = decode_offline_image(row.image_b64)
            pixels = self.transform(image)
        except (ClipsearchError, OSError, ValueError) as exc:
            log.warning("%s:%d skipped: %s", self.pairs.path.name, row.line, exc)
            return None
        return pixels, self.tokenizer([row.text])[0]


def decode_offline_image(image_b64: str, field: str = "image") -> Any:
    """Decode an image for an offline job: the service's decoder, with the offline jobs' larger limits."""
    return decode_image(image_b64, field=field, max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_IMAGE_PIXELS)


def collate(batch: list[tuple[torch.Tensor, torch.Tensor] | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    good = [b for b in batch if b is not None]
    if not good:
        return None
    return torch.stack([b[0] for b in good]), torch.stack([b[1] for b in good])


def image_key(image_b64: str) -> str:
    """Identity of an image for duplicate detection: hash of its normalized base64 (either alphabet)."""
    norm = image_b64.strip().replace("-", "+").replace("_", "/").rstrip("=")
    return hashlib.sha1(norm.encode()).hexdigest()
