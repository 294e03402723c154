"""An export (`clipsearch export`) served through the model seam: `onnx:DIR` runs its graphs on
ONNX Runtime, `openvino:DIR` on OpenVINO. `ExportedClip` stands where the torch model stands
in `ClipModel` (encode_text, encode_image, logit_scale, logit_bias), so the engine, the
batcher, search and the builder run an export as they run the torch model: the runtime is
chosen here, once, where the model is loaded.

Vectors keep the source model's fingerprint, so indexes built with the torch model serve
with its export (and the other way round) and an index of another model is refused.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import open_clip
import torch

from clipsearch.core.errors import ModelLoadError
from clipsearch.core.fsutil import sha256_file
from clipsearch.model import hf
from clipsearch.model.bpe import ClipBpe
from clipsearch.model.pil_transform import PilTransform

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
    tokenizer: str = "open_clip"  # open_clip's BPE, or "hf": a tokenizers/transformers tokenizer in tokenizer/
    tokenizer_options: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)  # open_clip's PreprocessCfg, or {} (HF processor/)
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




class _Visual:
    def __init__(self, image_size: tuple[int, int]) -> None:
        self.image_size = image_size


class ExportedClip(torch.nn.Module):
    """An export's two graphs behind the torch model's interface."""

    def __init__(self, directory: Path, manifest: ExportManifest, runtime: str, threads: int,
                 device: torch.device) -> None:
        super().__init__()
        self.family = manifest.family
        self.pad_id = manifest.pad_id
        self.trims_padding = manifest.trims_padding
        self.runtime = runtime
        self.visual = _Visual(manifest.image_size)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(manifest.logit_scale)), requires_grad=False)
        self.logit_bias = None if manifest.logit_bias is None else \
            torch.nn.Parameter(torch.tensor(manifest.logit_bias), requires_grad=False)
        run = _onnx_runner if runtime == "onnx" else _openvino_runner
        self._text = run(directory, "text", threads, device)
        self._image = run(directory, "image", threads, device)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._text(ids.cpu().numpy().astype(np.int64, copy=False)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._image(pixels.float().cpu().numpy()))


def _onnx_runner(directory: Path, tower: str, threads: int, device: torch.device) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError("onnx: models need ONNX Runtime: pip install 'clipsearch[onnx]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(directory / f"{tower}.onnx"), options, providers=providers)
    name = session.get_inputs()[0].name

    def run(array: np.ndarray) -> np.ndarray:
        return session.run(None, {name: array})[0]

    return run


def _openvino_runner(directory: Path, tower: str, threads: int, device: torch.device) -> Any:
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


def load(runtime: str, directory: Path, device: torch.device) -> tuple[ExportedClip, Any, Any, ExportManifest]:
    """(model, image transform, tokenizer, manifest) of the export in `directory`."""
    manifest = ExportManifest.read(directory)
    for name, digest in manifest.files.items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            raise ModelLoadError(f"{directory}: {name} is missing or changed since the export; export again")
    threads = max(1, torch.get_num_threads())
    model = ExportedClip(directory, manifest, runtime, threads, device)
    return model, _transform(directory, manifest), _tokenizer(directory, manifest), manifest


def _tokenizer(directory: Path, manifest: ExportManifest) -> Any:
    ctx = manifest.context_length
    if manifest.tokenizer == "open_clip":
        return ClipBpe(directory / "bpe_simple_vocab_16e6.txt.gz", context_length=ctx)
    options = manifest.tokenizer_options
    if options.get("open_clip"):
        return open_clip.tokenizer.HFTokenizer(str(directory / "tokenizer"), context_length=ctx,
                                               clean=options.get("clean", "whitespace"),
                                               strip_sep_token=bool(options.get("strip_sep_token")))
    transformers = hf._transformers()
    return hf.TextTokenizer(transformers.AutoTokenizer.from_pretrained(str(directory / "tokenizer")), ctx)


def _transform(directory: Path, manifest: ExportManifest) -> Any:
    if not manifest.preprocess:
        transformers = hf._transformers()
        return hf.ImageTransform(transformers.AutoImageProcessor.from_pretrained(str(directory / "processor")))
    return TensorOf(PilTransform.from_config(manifest.preprocess))


class TensorOf:
    """A preprocessing in numpy, as the seam's callers take it: a torch tensor."""

    def __init__(self, transform: PilTransform) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> torch.Tensor:
        return torch.from_numpy(self.transform(image))
