"""Labelled images for zero-shot classification: a folder with one subfolder per class (the
torchvision ImageFolder layout), or a TSV of `label<TAB>base64image`. Class names are the
folder names (or the labels) in sorted order, or given in a file, one per line, in that
order (`--classnames`: the readable names of folders such as `n01440764`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipsearch.images.codec import open_image
from clipsearch.inputs.pairs import MAX_IMAGE_PIXELS, decode_offline_image
from clipsearch.inputs.readers import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class LabelledSet:
    classes: list[str]
    images: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def image(self, i: int) -> Any:
        return self.images[i][1]()


def read_labelled(path: str | Path, classnames: str | Path | None = None) -> LabelledSet:
    path = Path(path)
    if path.is_dir():
        folders = sorted(p for p in path.iterdir() if p.is_dir())
        if not folders:
            raise InputError(f"{path}: no class subfolders (one folder of images per class)")
        out = LabelledSet([f.name for f in folders])
        for number, folder in enumerate(folders):
            for file in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                out.images.append((str(file), _file(file)))
                out.labels.append(number)
    elif path.is_file():
        rows: list[tuple[str, str, int]] = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    label, sep, b64 = line.rstrip("\n").partition("\t")
                    if not sep:
                        raise InputError(f"{path}:{line_no}: expected label<TAB>base64image")
                    rows.append((label.strip(), b64.strip(), line_no))
        out = LabelledSet(sorted({label for label, _, _ in rows}))
        index = {name: i for i, name in enumerate(out.classes)}
        for label, b64, line_no in rows:
            out.images.append((f"{path.name}:{line_no}", _b64(b64, f"{path.name}:{line_no}")))
            out.labels.append(index[label])
    else:
        raise InputError(f"{path}: no such folder or file")
    if classnames is not None:
        names = [line.strip() for line in Path(classnames).read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) != len(out.classes):
            raise InputError(f"{classnames}: {len(names)} names for {len(out.classes)} classes")
        out.classes = names
    return out


def _file(file: Path) -> Callable[[], Any]:
    return lambda: open_image(file.read_bytes(), field=str(file), max_pixels=MAX_IMAGE_PIXELS)


def _b64(b64: str, name: str) -> Callable[[], Any]:
    return lambda: decode_offline_image(b64, field=name)
