"""Training and evaluation pairs: EasyNLP TSV rows (text + image, optional id), read lazily
by line offset through the same column parsing as the index builder's TSV reader."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipsearch.images.codec import decode_image
from clipsearch.inputs.readers import (
    InputError,
    column_count,
    default_columns,
    parse_schema,
    strip_bom,
    tsv_record,
)

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 100_000_000


@dataclass
class PairRow:
    line: int
    id: str
    text: str
    image_b64: str


class PairFile:
    """The pair rows of a TSV, held as byte offsets, not strings. Without a schema a row of
    2 columns is text, image and one of 3 is id, text, image; other rows are skipped."""

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
                    if self._columns(column_count(raw)) is None:
                        self.skipped.append((line_no, "wrong number of columns"))
                    else:
                        self.offsets.append((offset, line_no))
                offset += len(raw)
        if not self.offsets:
            raise InputError(f"{self.path}: no text<TAB>image rows")

    def _columns(self, n: int) -> list[str] | None:
        if self.columns is not None:
            return self.columns if n == len(self.columns) else None
        return default_columns(n)

    def __len__(self) -> int:
        return len(self.offsets)

    def row(self, i: int) -> PairRow:
        offset, line_no = self.offsets[i]
        with open(self.path, "rb") as f:
            f.seek(offset)
            raw = f.readline()
        if line_no == 1:
            raw = strip_bom(raw)
        columns = self._columns(column_count(raw)) or []
        rec = tsv_record(raw, columns, f"{self.path.name}:{line_no}", str(line_no))
        return PairRow(line_no, rec.id, rec.text or "", rec.image_b64 or "")


def decode_offline_image(image_b64: str, field: str = "image") -> Any:
    """Decode an image for an offline job: the service's decoder, with the offline jobs' larger limits."""
    return decode_image(image_b64, field=field, max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_IMAGE_PIXELS)


def image_key(image_b64: str) -> str:
    """Identity of an image for duplicate detection: hash of its normalized base64 (either alphabet)."""
    norm = image_b64.strip().replace("-", "+").replace("_", "/").rstrip("=")
    return hashlib.sha1(norm.encode()).hexdigest()
