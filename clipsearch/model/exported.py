"""An export (`clipsearch export`) served through the model seam: `onnx:DIR` runs its graphs on
ONNX Runtime, `openvino:DIR` on OpenVINO. `ExportedModel` is the `base.Model` interface in
numpy, so the engine, the batcher, search and the builder run an export as they run the torch
model, and an export runs without torch (or transformers) installed: the runtime is chosen
once, where the model is loaded (`load.load_model`).

Vectors keep the source model's fingerprint, so indexes built with the torch model serve
with its export (and the other way round) and an index of another model is refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipsearch.core.cpus import usable_cores
from clipsearch.core.errors import ModelLoadError
from clipsearch.core.fsutil import sha256_file
from clipsearch.model.base import ModelInfo, TextSide
from clipsearch.model.bpe import ClipBpe
from clipsearch.model.pil_transform import PilTransform
from clipsearch.model.portable import PortableTokenizer, ProcessorTransform

log = logging.getLogger(__name__)

RUNTIMES = ("onnx", "openvino")
MANIFEST = "export.json"
FORMAT_VERSION = 1
OPSET = 17
Format = Literal["onnx", "openvino"]
Quantize = Literal["none", "int8"]


@dataclass
class ExportManifest:
    """What `export.json` holds."""

    family: str
    dim: int
    context_length: int
    image_size: tuple[int, int]
    logit_scale: float
    logit_bias: float | None
    pad_id: int
    source_spec: str
    source_fingerprint: str
    quantize: str = "none"
    format: str = "onnx"
    # open_clip's BPE; "tokenizers": tokenizer/tokenizer.json with `portable.PortableTokenizer`;
    # "hf": the transformers tokenizer in tokenizer/
    tokenizer: str = "open_clip"
    tokenizer_options: dict[str, Any] = field(default_factory=dict)
    # open_clip's PreprocessCfg; {"kind": "transformers", ...}: `portable.ProcessorTransform`'s;
    # {}: the transformers image processor in processor/
    preprocess: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    trims_padding: bool = False  # the text graph takes ids cut after the batch's longest text
    format_version: int = FORMAT_VERSION

    @classmethod
    def read(cls, directory: Path) -> ExportManifest:
        try:
            data = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{directory}: not an export ({MANIFEST}: {exc})") from None
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelLoadError(f"{directory}: export format {data.get('format_version')!r} is not "
                                 f"{FORMAT_VERSION}; export the model again")
        data["image_size"] = tuple(data["image_size"])
        return cls(**data)




@dataclass(frozen=True)
class Device:
    """Where an export runs, in the shape of a `torch.device` (`.type`), without torch."""

    type: str = "cpu"
    index: int | None = None

    def __str__(self) -> str:
        return self.type


CPU = Device()


class ExportedModel(TextSide):
    """An export's two graphs with its tokenizer and preprocessing: the `base.Model` interface
    in numpy, without torch (an export whose tokenizer or image processor has no torch-free
    form reads them with transformers, see `portable`)."""

    def __init__(self, directory: Path, manifest: ExportManifest, runtime: str, spec: str, gpu: bool = False
                 ) -> None:
        self.manifest = manifest
        self._directory, self._runtime, self._gpu = directory, runtime, gpu
        self.threads = 0
        device = CPU
        self.set_threads(default_threads())
        self.tokenizer = _tokenizer(directory, manifest)
        self.preprocess_transform = _transform(directory, manifest)
        self.device = device
        self.context_length = manifest.context_length
        self.image_size = manifest.image_size
        self.pad_id = manifest.pad_id
        self.trims_padding = manifest.trims_padding
        self.dim = manifest.dim
        self.info = ModelInfo(spec=spec, pretrained=None, fingerprint=manifest.source_fingerprint, dim=manifest.dim,
                              context_length=manifest.context_length, image_size=manifest.image_size,
                              device=str(device), dtype="float32", family=manifest.family, runtime=runtime)

    def set_threads(self, threads: int) -> None:
        """The runtime's intra-op threads for both towers (their sessions are made again)."""
        if threads == self.threads:
            return
        run = _onnx_runner if self._runtime == "onnx" else _openvino_runner
        self._text = run(self._directory, "text", threads, self._gpu)
        self._image = run(self._directory, "image", threads, self._gpu)
        self.threads = threads

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.tokenizer(list(texts)), dtype=np.int64)

    def preprocess(self, image: Any) -> np.ndarray:
        return np.asarray(self.preprocess_transform(image), dtype=np.float32)

    def encode_tokens(self, tokens: Any) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64)
        if self.trims_padding:  # the graph takes any length: cut after the batch's longest text
            used = np.flatnonzero((ids != self.pad_id).any(axis=0))
            ids = ids[:, : int(used[-1]) + 1 if len(used) else 1]
        return self._text(np.ascontiguousarray(ids))

    def encode_pixels(self, pixels: Any) -> np.ndarray:
        return self._image(np.ascontiguousarray(np.asarray(pixels, dtype=np.float32)))

    text_vectors = encode_tokens  # on the host already: the service searches them as they are
    image_vectors = encode_pixels

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = [self.encode_tokens(self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_images(self, images: Sequence[Any], batch_size: int = 128) -> np.ndarray:
        out = [self.encode_pixels(np.stack([self.preprocess(im) for im in images[i : i + batch_size]]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        for n in batch_sizes:
            self.encode_tokens(self.tokenize(["a photo"] * n))
            self.encode_pixels(np.zeros((n, 3, *self.image_size), np.float32))

    def capture_graphs(self, max_batch: int) -> list[str]:
        return []  # CUDA graphs are the torch runtime's

    @property
    def graphed_towers(self) -> list[str]:
        return []

    @property
    def logit_scale(self) -> float:
        return float(self.manifest.logit_scale)

    @property
    def logit_bias(self) -> float | None:
        return None if self.manifest.logit_bias is None else float(self.manifest.logit_bias)


def default_threads() -> int:
    """The runtime's threads: OMP_NUM_THREADS when it is set (the builder's encoder processes
    share the CPUs that way), else one per CPU this process may use."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return usable_cores()


def _onnx_runner(directory: Path, tower: str, threads: int, gpu: bool) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError("onnx: models need ONNX Runtime: pip install 'clipsearch[onnx]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(directory / f"{tower}.onnx"), options,
                                   providers=onnx_providers(gpu, ort.get_available_providers()))
    name = session.get_inputs()[0].name

    def run(array: np.ndarray) -> np.ndarray:
        return session.run(None, {name: array})[0]

    return run


PROVIDERS_ENV = "CLIPSEARCH_ONNX_PROVIDERS"


def onnx_providers(gpu: bool, available: Sequence[str]) -> list[str]:
    """ONNX Runtime's execution providers, first choice first: those named in
    CLIPSEARCH_ONNX_PROVIDERS (comma-separated, e.g. `TensorrtExecutionProvider,
    CUDAExecutionProvider`), else CUDA's on a GPU device when onnxruntime-gpu has it; the CPU
    provider last in every case. A named provider this ONNX Runtime lacks is an error."""
    named = [p.strip() for p in os.environ.get(PROVIDERS_ENV, "").split(",") if p.strip()]
    missing = [p for p in named if p not in available]
    if missing:
        raise ModelLoadError(f"{PROVIDERS_ENV}: {', '.join(missing)} not in this ONNX Runtime (it has "
                             f"{', '.join(available)})")
    if not named and gpu and "CUDAExecutionProvider" in available:
        named = ["CUDAExecutionProvider"]
    return [p for p in named if p != "CPUExecutionProvider"] + ["CPUExecutionProvider"]


def _openvino_runner(directory: Path, tower: str, threads: int, gpu: bool) -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise ModelLoadError("openvino: models need OpenVINO: pip install openvino") from None
    path = directory / f"{tower}.xml"
    compiled = ov.Core().compile_model(str(path if path.exists() else directory / f"{tower}.onnx"), "CPU",
                                       {"INFERENCE_NUM_THREADS": threads})

    def run(array: np.ndarray) -> np.ndarray:
        return np.asarray(compiled([array])[0])

    return run


def split_spec(spec: str) -> tuple[str, Path] | None:
    """(runtime, directory) of an `onnx:DIR` or `openvino:DIR` spec, else None."""
    for runtime in RUNTIMES:
        if spec.startswith(runtime + ":"):
            return runtime, Path(spec[len(runtime) + 1 :]).expanduser().resolve()
    return None


def load_model(spec: str, pretrained: str | None = None, device: str = "auto") -> ExportedModel:
    """The export an `onnx:DIR` / `openvino:DIR` spec names, its files checked against the manifest.
    `device`: auto or cuda put ONNX Runtime's CUDA provider first when it is installed
    (onnxruntime-gpu); arrays stay on the host either way."""
    found = split_spec(spec.strip())
    if found is None:
        raise ModelLoadError(f"{spec}: not an export spec (onnx:DIR or openvino:DIR)")
    if pretrained not in (None, "", "none"):
        raise ModelLoadError(f"{spec}: an export carries its weights; --pretrained does not apply")
    runtime, directory = found
    manifest = ExportManifest.read(directory)
    for name, digest in manifest.files.items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            raise ModelLoadError(f"{directory}: {name} is missing or changed since the export; export again")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelLoadError(f"device {device!r}: an export runs on auto, cpu or cuda")
    model = ExportedModel(directory, manifest, runtime, f"{runtime}:{directory}", gpu=device != "cpu")
    log.info("loaded %s:%s (an export of %s) on %s", runtime, directory, manifest.source_spec, runtime)
    return model


def _tokenizer(directory: Path, manifest: ExportManifest) -> Any:
    ctx = manifest.context_length
    if manifest.tokenizer == "open_clip":
        return ClipBpe(directory / "bpe_simple_vocab_16e6.txt.gz", context_length=ctx)
    if manifest.tokenizer == "tokenizers":
        return PortableTokenizer(directory / "tokenizer" / "tokenizer.json", ctx, manifest.tokenizer_options)
    from clipsearch.model import hf  # transformers-family tokenizers: transformers (and torch)

    options = manifest.tokenizer_options
    if options.get("open_clip"):
        import open_clip

        return open_clip.tokenizer.HFTokenizer(str(directory / "tokenizer"), context_length=ctx,
                                               clean=options.get("clean", "whitespace"),
                                               strip_sep_token=bool(options.get("strip_sep_token")))
    transformers = hf._transformers()
    return hf.TextTokenizer(transformers.AutoTokenizer.from_pretrained(str(directory / "tokenizer")), ctx)


def _transform(directory: Path, manifest: ExportManifest) -> Any:
    if manifest.preprocess.get("kind") == "transformers":
        return ProcessorTransform(manifest.preprocess)
    if not manifest.preprocess:
        from clipsearch.model import hf

        transformers = hf._transformers()
        return hf.ImageTransform(transformers.AutoImageProcessor.from_pretrained(str(directory / "processor")))
    return PilTransform.from_config(manifest.preprocess)
