"""Training batches: (pixels, tokens) per pair row, bad rows dropped."""

from __future__ import annotations

import logging
from typing import Any

import torch

from clipsearch.core.errors import ClipsearchError
from clipsearch.inputs.pairs import PairFile, decode_offline_image

log = logging.getLogger(__name__)


class PairDataset(torch.utils.data.Dataset):
    """(pixels, tokens) per row; a row whose image does not decode yields None (dropped by `collate`)."""

    def __init__(self, pairs: PairFile, transform: Any, tokenizer: Any) -> None:
        self.pairs = pairs
        self.transform = transform
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.pairs)

    def filler(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One (pixels, tokens) row of a blank image and an empty text: what a rank with fewer
        rows than the others pads its share with (encoded, then cut off before the loss)."""
        from PIL import Image

        if not hasattr(self, "_filler"):
            self._filler = self.transform(Image.new("RGB", (64, 64))), self.tokenizer([""])[0]
        return self._filler

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


def collate(batch: list[tuple[torch.Tensor, torch.Tensor] | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    good = [b for b in batch if b is not None]
    if not good:
        return None
    return torch.stack([b[0] for b in good]), torch.stack([b[1] for b in good])
