"""Synthetic captioned images in EasyNLP's TSV layout (`text<TAB>base64image`).

Each image shows 1-3 shapes of one colour and size at one position on a coloured
background; the caption says so, in English or Chinese. Deterministic for a seed, so
users and tests can train, index and search with no download.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipsearch.core.fsutil import atomic_write_bytes

COLOURS = {
    "red": ((220, 30, 30), "红色"),
    "green": ((30, 170, 40), "绿色"),
    "blue": ((30, 60, 220), "蓝色"),
    "yellow": ((240, 220, 30), "黄色"),
    "purple": ((140, 40, 180), "紫色"),
    "orange": ((250, 140, 20), "橙色"),
}
BACKGROUNDS = {
    "white": ((245, 245, 245), "白色"),
    "black": ((15, 15, 15), "黑色"),
    "grey": ((128, 128, 128), "灰色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}
SIZES = {"small": "小", "large": "大"}
POSITIONS = {"left": "左边", "right": "右边", "top": "上面", "bottom": "下面", "center": "中间"}
COUNTS = {1: ("one", "一个"), 2: ("two", "两个"), 3: ("three", "三个")}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    count: int

    def caption(self, lang: str = "en", parts: tuple[bool, bool, bool] = (True, True, True)) -> str:
        """The caption; `parts` says whether size, position and background are mentioned
        (colour, shape and count always are), so short queries like "a red circle" are in
        the training distribution too."""
        with_size, with_position, with_background = parts
        if lang == "zh":
            where = f"{BACKGROUNDS[self.background][1]}背景" if with_background else ""
            where += POSITIONS[self.position] if with_position else ""
            size = f"{SIZES[self.size]}的" if with_size else ""
            thing = f"{COUNTS[self.count][1]}{size}{COLOURS[self.colour][1]}{SHAPES[self.shape]}"
            return f"{where}有{thing}" if where else thing
        noun = self.shape + ("s" if self.count > 1 else "")
        article = COUNTS[self.count][0] if self.count > 1 else "a"
        words = [article] + ([self.size] if with_size else []) + [self.colour, noun]
        if with_position:
            words.append("in the center" if self.position == "center" else f"on the {self.position}")
        text = " ".join(words)
        if with_background:
            text += f"{',' if with_position else ''} on a {self.background} background"
        return text


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        shape=str(rng.choice(list(SHAPES))),
        colour=str(rng.choice(list(COLOURS))),
        size=str(rng.choice(list(SIZES))),
        position=str(rng.choice(list(POSITIONS))),
        background=str(rng.choice(list(BACKGROUNDS))),
        count=int(rng.integers(1, 4)),
    )


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)]
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        ang = np.pi / 2 + k * np.pi / 5
        pts.append((cx + rad * np.cos(ang), cy - rad * np.sin(ang)))
    return pts


def render(scene: Scene, rng: np.random.Generator, size: int = 128) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background][0])
    draw = ImageDraw.Draw(image)
    radius = size * (0.24 if scene.size == "large" else 0.15)
    centre = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
              "center": (0.5, 0.5)}[scene.position]
    colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[scene.colour][0])
    r_each = radius * (1 if scene.count == 1 else 0.7)
    for i in range(scene.count):
        offset = (i - (scene.count - 1) / 2) * r_each * 2.2  # side by side, barely touching
        horizontal = scene.position in ("top", "bottom", "center")
        cx = size * centre[0] + (offset if horizontal else 0) + rng.normal(0, size * 0.015)
        cy = size * centre[1] + (0 if horizontal else offset) + rng.normal(0, size * 0.015)
        r = r_each * rng.uniform(0.9, 1.1)
        if scene.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif scene.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_polygon(scene.shape, cx, cy, r * 1.15), fill=colour)
    return image


def synth_rows(n: int, seed: int = 0, lang: str = "en", image_size: int = 128) -> list[tuple[str, str, Scene]]:
    """n (caption, urlsafe base64 JPEG, scene) rows, deterministic for `seed`."""
    if lang not in ("en", "zh"):
        raise ValueError("lang must be en or zh")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        scene = random_scene(rng)
        buf = io.BytesIO()
        render(scene, rng, image_size).save(buf, format="JPEG", quality=90)
        flags = rng.random(3) < 0.5
        parts = (bool(flags[0]), bool(flags[1]), bool(flags[2]))
        rows.append((scene.caption(lang, parts), base64.urlsafe_b64encode(buf.getvalue()).decode(), scene))
    return rows


def write_tsv(path: str | os.PathLike[str], n: int, seed: int = 0, lang: str = "en", image_size: int = 128) -> Path:
    """Write `n` rows to `path` (atomically)."""
    rows = synth_rows(n, seed, lang, image_size)
    data = "".join(f"{caption}\t{image}\n" for caption, image, _ in rows)
    atomic_write_bytes(path, data.encode("utf-8"))
    return Path(path)
