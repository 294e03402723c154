"""A tiny open_clip architecture for tests, benchmarks and the offline demo.

No weights are downloaded: `write_tiny_model` builds the model with seeded random
weights and saves it as a `local-dir:` checkpoint through the model seam's writer.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import open_clip
import torch

from clipsearch.core.model import MODEL_CONFIG_DIR, save_local_dir

TINY_MODEL_NAME = "clipsearch-tiny"
TINY_MODEL_CFG: dict[str, Any] = json.loads((MODEL_CONFIG_DIR / f"{TINY_MODEL_NAME}.json").read_text())


def tiny_model_cfg(image_size: int = 64, embed_dim: int = 64) -> dict[str, Any]:
    cfg = copy.deepcopy(TINY_MODEL_CFG)
    cfg["vision_cfg"]["image_size"] = image_size
    cfg["embed_dim"] = embed_dim
    return cfg


def build_tiny_model(cfg: dict[str, Any] | None = None, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised open_clip CLIP with the given (default tiny) config."""
    cfg = copy.deepcopy(cfg or TINY_MODEL_CFG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg)
    return model.eval()


def write_tiny_model(
    directory: str | os.PathLike[str], cfg: dict[str, Any] | None = None, seed: int = 0
) -> str:
    """Write a random tiny model to `directory`; returns its `local-dir:` spec."""
    cfg = copy.deepcopy(cfg or TINY_MODEL_CFG)
    save_local_dir(build_tiny_model(cfg, seed), cfg, directory)
    return "local-dir:" + str(Path(directory).resolve())
