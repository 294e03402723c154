"""What a build is asked to do (`BuildOptions`), what it reports (`BuildSummary`) and how it fails."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipsearch.inputs.readers import InputPath

ENGINES = ("local", "ray")


class BuildError(RuntimeError):
    """The build cannot finish (too many bad records, nothing to index, ...)."""


@dataclass
class BuildOptions:
    inputs: list[InputPath]  # local paths or fsspec URLs (readers.input_path)
    output: Path
    model: str
    pretrained: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    index_type: str = "auto"
    fmt: str = "auto"
    schema: str | None = None
    batch_size: int = 256
    workers: int = 0  # decode worker processes beside the model (processes=1 only)
    processes: int = 1  # encoder processes, each with its own model, each encoding whole spans
    shard_size: int = 1024  # lines per span: the unit of resume, of work for --processes, of progress
    max_errors: int | None = None
    max_error_fraction: float = 0.5  # refuse to publish when more of the records than this were bad
    keep: int = 3
    recall_target: float = 0.95
    refine: str = "auto"  # IVF-PQ: re-rank by fp16 vectors when the codes miss the recall target; always; never
    memory_budget: int = 4 << 30
    flat_max: int = 20_000
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    image_decode: str = "exact"  # exact | draft | torch, as the service's CLIPSEARCH_IMAGE_DECODE
    exif_orientation: bool = False  # turn images upright by their EXIF orientation, as CLIPSEARCH_EXIF_ORIENTATION
    progress: bool = True
    hash_inputs: bool = True
    confine: bool = False  # refuse image paths outside each input's folder (inputs from untrusted hands)
    thumbnails: bool = True  # a small JPEG per image item, for the search page
    base: bool = False  # extend the published version: reuse its vectors, encode only the inputs
    delete: Path | None = None  # with base: a file of ids to leave out of the new version
    dedup: bool = False  # leave out exact duplicate images (same bytes) and texts after their first
    engine: str = "local"  # local | ray (clipsearch.builder.ray_engine: the same shards, encoded on a Ray cluster)
    ray_address: str | None = None  # auto, ray://head:10001, host:6379; None starts a local Ray
    ray_actors: int = 0  # encoder actors; 0: one per GPU of the cluster, else one per two CPUs


@dataclass
class BuildSummary:
    version: str
    version_dir: Path
    records: int
    encoded: dict[str, int]
    skipped: int
    skip_reasons: dict[str, int]
    errors: list[dict[str, str]]
    seconds: float
    items_per_second: float
    indexes: dict[str, dict[str, Any]]
    resumed_shards: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        lines = [
            f"published version {self.version} -> {self.version_dir}",
            f"records read: {self.records}   encoded: "
            + ", ".join(f"{k} {v}" for k, v in self.encoded.items())
            + f"   skipped: {self.skipped}",
        ]
        for reason, n in sorted(self.skip_reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  skipped {n} x {reason}")
        for err in self.errors[:10]:
            lines.append(f"  e.g. {err['source']} ({err['field']}): {err['reason']}")
        lines.append(f"time: {self.seconds:.1f} s   {self.items_per_second:.1f} items/s"
                     + (f"   (resumed {self.resumed_shards} shards)" if self.resumed_shards else ""))
        for modality, info in self.indexes.items():
            recall = info.get("recall_at_10")
            lines.append(f"{modality} index: {info['count']} vectors, {info['factory']}, "
                         f"params {info['search_params']}, "
                         f"recall@10 {'exact' if info['index_type'] == 'flat' else f'{recall:.3f}'}")
        return "\n".join(lines)
