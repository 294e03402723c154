"""The one settings class: environment variables `CLIPSEARCH_*`, the same knobs as
`clipsearch serve` flags, and the configuration table in docs/configuration.md, all made
from the fields below (`python -m service.settings` prints the table)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, JsonValue, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from clipsearch.core.fsutil import read_list_file

DEFAULT_BODY_CAP = 32 << 20  # bodies are held in memory until parsed: a hard cap unless set explicitly
Listed = Annotated[list[str], NoDecode]  # comma-separated in the environment and on the command line
TUNING: dict[str, JsonValue] = {"group": "tuning"}  # rarely changed: a table of their own in the docs


class Settings(BaseSettings):
    """Service configuration. Every field is `CLIPSEARCH_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="CLIPSEARCH_", extra="ignore", env_file=None)

    # model
    model: str = Field(
        "clipsearch-tiny",
        description="model spec: an open_clip name (ViT-B-32), hf-hub:org/repo or local-dir:/path; or a "
        "transformers CLIP, Chinese-CLIP or SigLIP checkpoint: hf:org/repo or hf:/path; or an export "
        "(clipsearch export) run on ONNX Runtime or OpenVINO: onnx:DIR, openvino:DIR",
    )
    pretrained: str | None = Field(
        None, description="for built-in names: a pretrained tag, a checkpoint path, or none (random weights)"
    )
    served_model_name: str | None = Field(
        None, description="the model's name on the OpenAI-compatible routes [the model spec]")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp32 on CPU, fp16 on GPU")

    # index
    index_dir: Path | None = Field(None, description="index directory (a version, or a root with CURRENT)")
    index_verify: Literal["auto", "full", "off"] = Field(
        "auto", description="check a version's files against its manifest's checksums before serving it: auto "
        "checks files up to 1 GiB whole and larger ones by 256 sampled blocks (a reload stays seconds), full "
        "reads every byte, off trusts the disk; `clipsearch index verify` checks everything offline")
    index_poll_s: float = Field(
        5.0, ge=0, description="how often to look for a newly published index version; 0 = only /admin/reload"
    )
    search_backend: Literal["auto", "faiss-cpu", "faiss-gpu", "torch"] = Field(
        "auto", description="auto: faiss-gpu, else torch on a GPU, else faiss-cpu"
    )

    # HTTP
    host: str = Field("0.0.0.0", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port (0: a free one, printed at start)")
    workers: int = Field(
        1, ge=1, le=64, description="server processes sharing the port, each with its own model copy; one "
        "Python process tops out at a few thousand requests/s, so a fast GPU needs several",
    )
    log_level: str = Field("info", description="Python log level")
    access_log: bool = Field(False, description="log every request (metrics count them anyway)")
    api_keys: SecretStr | None = Field(
        None, description="comma-separated API keys: when set (or with api_keys_file), every route but /healthz, "
        "/readyz and the search page's files (/ui, public by design) needs `Authorization: Bearer <key>`")
    api_keys_file: Path | None = Field(
        None, description="a file of API keys, one per line (# comments), read again when it changes")
    admin_token: SecretStr | None = Field(None, description="token for /admin routes; unset disables them")
    expose_internals: bool = Field(
        True, description="GET / shows the index path on disk, the checkpoint's fingerprint, pid and runtime "
        "settings; off for a service clients reach directly (keep /metrics and /admin on an internal network)",
    )
    max_connections: int | None = Field(
        None, ge=1, description="open connections per server process; more are answered 503 and closed [the "
        "open-file limit - 128, at most 8192]",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection whose request headers are not complete this long after it opened "
        "(or after its last response) is closed",
    )
    body_timeout_s: float = Field(60.0, gt=0, description="a request body not received in this time gets 408")
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections are closed after this")

    # limits
    max_items_per_request: int = Field(64, ge=1, description="texts + images in one request")
    max_text_chars: int = Field(2000, ge=1, description="longest text accepted, in characters")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest decoded image, in bytes")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest image, width x height")
    max_k: int = Field(1000, ge=1, description="most search results one request may ask for")
    max_body_bytes: int | None = Field(
        None, ge=1024, description="largest request body, refused with 413 while it streams in [the items at "
        "their limits, at most 32 MiB]",
    )
    max_queue: int = Field(2048, ge=1, description="most items waiting per modality before 429")
    request_timeout_s: float = Field(30.0, gt=0, description="a request waiting longer gets 504")

    # other clients' APIs (docs/api.md, "Use it from ...")
    openai_api: bool = Field(True, description="the OpenAI embeddings API: /v1/embeddings, /v1/models")
    infinity_api: bool = Field(True, description="infinity's routes: /embeddings, /models, /rerank")
    clip_retrieval_api: bool = Field(
        True, description="clip-retrieval's back end: /knn-service, /metadata, /indices-list (ClipClient, "
        "clip-front)")
    weaviate_api: bool = Field(
        True, description="Weaviate's multi2vec-clip inference API: /vectorize, /meta, /.well-known/live|ready")
    immich_api: bool = Field(True, description="immich's machine-learning API: /predict (CLIP), /ping")
    immich_model_names: Listed = Field(
        [], description="comma-separated model names immich may ask /predict for (its CLIP model setting, e.g. "
        "`ViT-B-32__openai`), answered by the served model; the served name is always accepted")
    openai_max_inputs: int = Field(
        2048, ge=1, le=65536, description="inputs in one OpenAI-style embeddings call (/v1/embeddings, "
        "/embeddings), as OpenAI takes; run max_items_per_request at a time, long texts cut to the model's context")
    cors_origins: Listed = Field(
        [], description="comma-separated origins (`https://app.example.com`) whose pages may call the API from "
        "a browser; `*` for any; empty: no cross-origin calls. API keys apply as ever")

    # images
    image_decode: Literal["exact", "draft", "torch"] = Field(
        "exact",
        description="exact: open_clip's own preprocessing, bit for bit; draft: JPEGs decode at a reduced "
        "scale that still covers the model's input (2-3x faster on photos, cosine to exact >= 0.999); "
        "torch: JPEGs decode with libjpeg-turbo, or batched nvJPEG on a GPU, and resize as tensor ops "
        "(within one grey level of exact)",
    )
    exif_orientation: bool = Field(
        False, description="turn each image upright by its EXIF orientation first (open_clip does not); "
        "build the index with the same setting",
    )

    # image URLs
    image_urls: Listed = Field(
        [], description="comma-separated hosts (`img.example.com`, `*.example.com`) or URL "
        "prefixes (`https://cdn.example.com/public/`) that images may be fetched from by URL; empty: image "
        "URLs are refused")
    image_url_networks: Listed = Field(
        [], description="comma-separated networks (`10.0.0.0/8`) that allowed image URLs may "
        "resolve to although private, loopback or link-local; any other such address is refused")
    image_url_timeout_s: float = Field(10.0, gt=0, description="an image URL not fetched in this time is refused")

    # tuning
    max_batch_size: int = Field(64, ge=1, le=8192, description="most items per model call",
                                json_schema_extra=TUNING)
    max_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="extra wait for a batch to fill; 0 = pure greedy batching",
        json_schema_extra=TUNING,
    )
    overload_wait_ms: float = Field(
        1000.0, ge=0, le=5000, description="a request that finds the queue full waits this long for room before "
        "its 429 (as long as the Retry-After it then gets): clients that retry at once are paced instead of "
        "spinning the event loop; raise it when storms are many times the capacity",
        json_schema_extra=TUNING,
    )
    warmup: bool = Field(True, description="run the model on dummy input before serving",
                         json_schema_extra=TUNING)
    cuda_graphs: bool = Field(
        True, description="on a GPU, replay both towers from CUDA graphs captured at bucketed batch sizes "
        "(each checked against eager at start); saves the kernel launches of small batches",
        json_schema_extra=TUNING,
    )
    preprocess_workers: int = Field(
        default_factory=lambda: min(32, os.cpu_count() or 1), ge=1,
        description="threads that decode and check images off the event loop [cores, at most 32]",
        json_schema_extra=TUNING,
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for model math, torch's or an export's runtime "
        "[cores, shared by the workers]",
        json_schema_extra=TUNING,
    )

    @field_validator("image_urls", "image_url_networks", "immich_model_names", "cors_origins", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_items_per_request > self.max_queue:
            raise ValueError("max_items_per_request must not exceed max_queue (such a request could never run)")
        if self.workers > 1 and self.index_dir is not None and self.index_poll_s == 0:
            raise ValueError("with several workers, index_poll_s must be above 0: POST /admin/reload reaches only "
                             "the worker that answers it, and the others learn of a new index by polling")
        if self.api_keys_file is not None:
            try:
                if not read_list_file(self.api_keys_file):
                    raise ValueError(f"api_keys_file {self.api_keys_file} holds no key")
            except OSError as exc:
                raise ValueError(f"api_keys_file {self.api_keys_file}: {exc.strerror}") from None
        from clipsearch.service.fetch import ImageFetcher  # checks the entries: a bad one stops the service at start

        ImageFetcher(self.image_urls, self.image_url_networks, max_bytes=1, timeout_s=1)
        return self

    @property
    def has_api_keys(self) -> bool:
        """Whether the API needs a key (keys given, or a key file)."""
        given = self.api_keys is not None and any(k.strip() for k in self.api_keys.get_secret_value().split(","))
        return given or self.api_keys_file is not None

    @property
    def served_name(self) -> str:
        """The model's name on the OpenAI-compatible routes."""
        return self.served_model_name or self.model

    @property
    def public_model_name(self) -> str:
        """The model's name for routes anyone may call: with internals hidden, no disk path
        (a directory spec shows as its last part)."""
        if self.expose_internals or self.served_model_name:
            return self.served_name
        kind, sep, rest = self.model.partition(":")
        if sep and (kind == "local-dir" or rest.startswith("/")):
            return f"{kind}:{Path(rest).name}"
        return self.model

    @property
    def wide_body_limit(self) -> int:
        """Largest body of the OpenAI-style embeddings routes (up to `openai_max_inputs` items):
        `max_body_bytes`, or 32 MiB."""
        return self.max_body_bytes if self.max_body_bytes is not None else max(self.body_limit, DEFAULT_BODY_CAP)

    @property
    def body_limit(self) -> int:
        """Largest request body: `max_body_bytes`, or all items at their size limits (in
        base64, plus slack), but never more than 32 MiB unless set explicitly."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        per_item = max(self.max_image_bytes * 4 // 3 + 64, self.max_text_chars * 6 + 16)
        return min(self.max_items_per_request * per_item + 64 * 1024, DEFAULT_BODY_CAP)


CLI_ONLY_ENV = frozenset({"admin_token", "api_keys"})  # secrets: environment only, never a flag (it would show in `ps`)


def is_tuning(name: str) -> bool:
    extra = Settings.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and extra.get("group") == "tuning"


def default_of(name: str) -> Any:
    """A setting's default as its help shows it (None where it depends on the machine)."""
    f = Settings.model_fields[name]
    if f.default_factory is not None:
        return None  # depends on the machine: the description says
    value = f.default
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def _type(name: str) -> str:
    annotation = Settings.model_fields[name].annotation
    args = getattr(annotation, "__args__", None)
    if getattr(annotation, "__origin__", None) is Literal and args:
        return " \\| ".join(str(a) for a in args)
    text = getattr(annotation, "__name__", None) or str(annotation)
    for noise, plain in (("typing.", ""), ("pathlib.", ""), ("pydantic.types.", ""), ("SecretStr", "str"),
                         (" | None", "")):
        text = text.replace(noise, plain)
    return text


def markdown_table(tuning: bool) -> str:
    rows = ["| variable | type | default | what it does |", "|---|---|---|---|"]
    for name, f in Settings.model_fields.items():
        if is_tuning(name) != tuning:
            continue
        default = default_of(name)
        shown = "" if default is None else f"`{default}`"
        where = " (environment only)" if name in CLI_ONLY_ENV else ""
        rows.append(f"| `CLIPSEARCH_{name.upper()}` | {_type(name)} | {shown} | {f.description}{where} |")
    return "\n".join(rows)


def configuration_doc() -> str:
    """docs/configuration.md, made from the fields above (a test checks the file is current)."""
    return f"""# Configuration

Every setting is an environment variable `CLIPSEARCH_<NAME>`, and (but for secrets) a flag of
`clipsearch serve`: `--max-batch-size 128` is `CLIPSEARCH_MAX_BATCH_SIZE=128`. Flags win over
the environment. A bad value stops the service at start with a message naming the setting.
This page is generated from `clipsearch/service/settings.py`
(`python -m clipsearch.service.settings > docs/configuration.md`).

## Settings

{markdown_table(tuning=False)}

## Tuning

Defaults that suit most deployments; what each changes is measured in [benchmarks](benchmarks.md).

{markdown_table(tuning=True)}
"""


if __name__ == "__main__":
    print(configuration_doc(), end="")
