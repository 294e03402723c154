"""The one settings class: environment variables `CLIPSEARCH_*`, and the same knobs as CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service configuration. Every field is `CLIPSEARCH_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="CLIPSEARCH_", extra="ignore", env_file=None)

    # model
    model: str = Field(
        "clipsearch-tiny",
        description="open_clip spec: a built-in name (ViT-B-32), hf-hub:org/repo or local-dir:/path",
    )
    pretrained: str | None = Field(
        None, description="for built-in names: a pretrained tag, a checkpoint path, or none (random weights)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp32 on CPU, fp16 on GPU")

    # index
    index_dir: Path | None = Field(None, description="index directory (a version, or a root with CURRENT)")
    index_poll_s: float = Field(
        5.0, ge=0, description="how often to look for a newly published index version; 0 = only /admin/reload"
    )
    search_backend: Literal["auto", "faiss-cpu", "faiss-gpu", "torch"] = Field(
        "auto", description="auto: faiss-gpu, else torch on a GPU, else faiss-cpu"
    )
    text_search_on_device: bool = Field(
        True, description="when the image index is searched by torch on the model's device (search_backend torch, "
        "or auto on a GPU without faiss-gpu), /search/text encodes and searches in one batched step there: the "
        "query vector never leaves the device and the request takes one batcher hop instead of two. "
        "Off: encode, then search, as two batched steps",
    )

    # HTTP
    host: str = Field("0.0.0.0", description="bind address")
    port: int = Field(8000, ge=1, le=65535, description="bind port")
    log_level: str = Field("info", description="Python log level")
    workers: int = Field(
        1, ge=1, le=64, description="server processes sharing the port, each with its own model copy and batchers "
        "(and CUDA graphs): one Python process tops out near 5,000 requests/s (~0.2 ms of event loop per "
        "request), so a fast GPU needs several. Metrics are reported across all of them",
    )
    reuse_port: bool = Field(
        False, description="with several workers on Linux, give each worker a listening socket of its own on the "
        "port (SO_REUSEPORT): the kernel spreads connections evenly over them by hash, where with one shared "
        "socket the first worker to wake takes the next one (unequal shares of long-lived connections). A worker "
        "that dies drops the connections still waiting in its own socket's queue",
    )
    access_log: bool = Field(False, description="log every request (metrics count them anyway)")

    # batching
    max_batch_size: int = Field(64, ge=1, le=8192, description="most items per model call")
    max_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="extra wait for a batch to fill; 0 = pure greedy batching"
    )
    max_queue: int = Field(2048, ge=1, description="most items waiting per modality before 429")
    request_timeout_s: float = Field(30.0, gt=0, description="a request waiting longer gets 504")
    warmup: bool = Field(
        True, description="run the model on dummy texts and images (batch 1 and a full batch) before serving"
    )
    cuda_graphs: bool = Field(
        True, description="on a GPU, replay both towers from CUDA graphs captured at start for batch sizes 1, 2, "
        "4 ... max_batch_size (at most 64), so a lone query skips ~5 ms of kernel launches; each tower is "
        "checked against eager at start and stays eager if they differ. No effect on the CPU",
    )
    worker_cpus: int = Field(
        0, ge=0, le=1024, description="keep each server process's threads on this many cores of its own "
        "(Linux; 0: off). For GPU servers, where one process's Python is its bound; on the CPU the model's "
        "threads get only these cores too",
    )
    cuda_wait: Literal["sleep", "spin"] = Field(
        "sleep", description="on a GPU, how the model thread waits for a batch: asleep on a blocking CUDA event, "
        "or CUDA's default busy-polling, which holds a core per server process while the GPU works",
    )
    preprocess_workers: int = Field(
        default_factory=lambda: min(32, os.cpu_count() or 1),
        ge=1,
        description="threads that decode, preprocess and tokenize off the event loop",
    )

    image_decode: Literal["exact", "draft", "torch"] = Field(
        "exact",
        description="exact: open_clip's own preprocessing, bit for bit; draft: JPEGs decode at a reduced "
        "scale that still covers the model's input (2-3x faster on photos; cosine to exact >= 0.999, tested); "
        "torch: JPEGs decode with libjpeg-turbo, or nvJPEG on a GPU, and resize/crop/normalize as tensor ops "
        "on the model's device (2x faster on CPU; within one grey level of exact, tested)",
    )

    exif_orientation: bool = Field(
        False, description="turn each image upright by its EXIF orientation before preprocessing (phone photos "
        "are often stored sideways); off by default because open_clip does not, so vectors equal open_clip's. "
        "Build the index with the same setting (index build --exif-orientation)",
    )
    image_decode_scope: Literal["auto", "request", "batch"] = Field(
        "auto", description="with image_decode=torch, where JPEGs decode: per request in the preprocess threads, "
        "or all JPEGs of a batch in one call (nvJPEG decodes a batch far faster than one image at a time); "
        "auto: batch on a GPU, request on the CPU",
    )

    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for model math; default cores - 1, leaving one for HTTP"
    )

    # limits
    max_items_per_request: int = Field(64, ge=1, description="texts + images in one /embed request")
    max_text_chars: int = Field(2000, ge=1, description="longest text accepted, in characters")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest decoded image, in bytes")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest image, width x height")
    max_k: int = Field(1000, ge=1, description="most search results one request may ask for")

    admin_token: SecretStr | None = Field(None, description="token for /admin routes; unset disables them")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_items_per_request > self.max_queue:
            raise ValueError("max_items_per_request must not exceed max_queue (such a request could never run)")
        if self.workers > 1 and self.index_dir is not None and self.index_poll_s == 0:
            raise ValueError("with several workers, index_poll_s must be above 0: POST /admin/reload reaches only "
                             "the worker that answers it, and the others learn of a new index by polling")
        return self

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: all items at their size limits, in base64, plus slack."""
        per_item = max(self.max_image_bytes * 4 // 3 + 64, self.max_text_chars * 6 + 16)
        return self.max_items_per_request * per_item + 64 * 1024
