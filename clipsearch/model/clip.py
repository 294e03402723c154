"""The one seam to the model: open_clip, or a transformers CLIP-family checkpoint.

Every part of clipsearch (service, index builder, fine-tuning) loads and runs the
model through this module, so they all tokenize and preprocess identically and a
vector from `/embed` equals a vector in an index built from the same checkpoint.

Model specs:

* ``ViT-B-32`` (any built-in open_clip name) with ``pretrained`` set to a tag
  (``laion2b_s34b_b79k``), a checkpoint path, or ``none`` / empty for random weights
  (seeded, so two loads of the same random spec give the same model);
* ``hf-hub:org/repo`` (config and weights from the Hugging Face Hub; needs network or
  a warm HF cache);
* ``local-dir:/path`` (a directory holding ``open_clip_config.json`` and weights, the
  format `save_local_dir` and the fine-tuning job write; or a transformers checkpoint,
  see below);
* ``hf:org/repo`` or ``hf:/path`` (a transformers ``CLIPModel``, ``ChineseCLIPModel`` or
  ``SiglipModel`` with its tokenizer and image processor, from the Hub or a directory
  written by ``save_pretrained``; `clipsearch.model.hf` wraps it). ``local-dir:`` on a
  directory whose ``config.json`` names one of those families loads the same way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from clipsearch.core.errors import ModelLoadError
from clipsearch.core.fsutil import atomic_dir, sha256_file, umask
from clipsearch.model import bpe, exported, hf
from clipsearch.model.base import ModelInfo, TextSide
from clipsearch.model.cuda_wait import to_numpy
from clipsearch.model.graphs import BucketedGraphs, Capture, batch_buckets, capture_cuda, length_buckets

log = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pth", "*.pt")
_RANDOM = {"", "none", "random"}
RANDOM_SEED = 0

# Our own built-in configs (the tiny demo/test model) become ordinary open_clip names.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when it is there, else CPU; `cuda` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on CPU and fp16 on GPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected one of auto, {', '.join(_DTYPES)}") from None


def _find_weights(directory: Path) -> Path | None:
    # Same preference as open_clip's own local-dir loader: safetensors first.
    preferred = [WEIGHTS_NAME, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in preferred:
        if (directory / name).is_file():
            return directory / name
    found = sorted(p for pat in _WEIGHT_PATTERNS for p in directory.glob(pat))
    return found[0] if found else None


def model_fingerprint(spec: str, pretrained: str | None) -> str:
    """A stable identity for the weights a spec loads; index manifests record it.

    Checkpoint files are hashed (so a moved or renamed directory still matches and a
    retrained one does not); tags and hub ids are named; random weights are seeded.
    """
    if spec.startswith(LOCAL_DIR):
        directory = Path(spec[len(LOCAL_DIR) :]).expanduser()
        weights = _find_weights(directory)
        if weights is None:
            raise ModelLoadError(f"{spec}: no weights file ({', '.join(_WEIGHT_PATTERNS)}) in {directory}")
        return "sha256:" + sha256_file(weights)
    if spec.startswith(HF_HUB):
        return spec
    if pretrained is None or pretrained.strip().lower() in _RANDOM:
        return f"random:{spec}:seed{RANDOM_SEED}"
    if os.path.isfile(pretrained):
        return "sha256:" + sha256_file(pretrained)
    return f"{spec}:{pretrained}"


class ClipModel(TextSide):
    """A loaded open_clip model with its own tokenizer and inference preprocessing.

    `tokenize` / `preprocess` are CPU work and thread-safe; `encode_tokens` /
    `encode_pixels` run the model and return float32, L2-normalized numpy arrays.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Any,
        tokenizer: Any,
        *,
        spec: str,
        pretrained: str | None,
        fingerprint: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model: Any = model  # an open_clip model: encode_text / encode_image / logit_scale
        self.preprocess_transform = preprocess
        self.tokenizer = tokenizer
        self._fast_tokenizer = FastClipTokenizer.wrap(tokenizer)
        self.device = device
        self.dtype = dtype
        self.context_length = int(getattr(tokenizer, "context_length", 77) or 77)
        wrapped = model if isinstance(model, hf.HFClip) else None
        self.is_open_clip = wrapped is None
        size = getattr(model.visual, "image_size", 224) if wrapped is None else wrapped.image_size
        self.image_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        # What a padded position holds: 0 for open_clip's BPE, the tokenizer's pad id for its HF
        # text towers, hf.PAD for transformers models (their mask rides in the ids).
        self.pad_id = hf.PAD if wrapped is not None else _pad_id(tokenizer)
        self.trims_padding = _supports_trimmed_text(model) if wrapped is None else wrapped.uses_mask
        self._graphs: dict[str, BucketedGraphs] = {}  # tower -> its CUDA graphs (see `capture_graphs`)
        self.dim = int(self.encode_tokens(self.tokenize([""])).shape[1])
        self.info = ModelInfo(
            spec=spec,
            pretrained=pretrained,
            fingerprint=fingerprint,
            dim=self.dim,
            context_length=self.context_length,
            image_size=self.image_size,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            family="open_clip" if wrapped is None else wrapped.family,
        )

    # -- CPU side -----------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids, shape (n, context_length), on the CPU: exactly open_clip's tokenizer output."""
        if self._fast_tokenizer is not None:
            return self._fast_tokenizer(texts)
        return self.tokenizer(list(texts))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """open_clip's own inference transform: (3, H, W) float32 on the CPU."""
        return self.preprocess_transform(image)

    # -- model side ---------------------------------------------------------------
    # Not thread-safe once graphs are captured (they replay from fixed buffers): the
    # service calls these from its one model thread.
    def encode_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        """Token ids -> vectors. Padding past the batch's longest text is cut off where
        the architecture makes that exact (causal mask, EOT pooling); see `trim_padding`."""
        return to_numpy(self.text_vectors(tokens))

    @torch.inference_mode()
    def text_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """`encode_tokens`, left on the model's device (for a search on the same device)."""
        if self.trims_padding:
            tokens = trim_padding(tokens, self.pad_id)
        tokens = tokens.to(self.device, non_blocking=True)
        features = self._graphs.get("text") or self._text_features
        return features(tokens)

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Preprocessed pixels (N, 3, H, W) -> vectors, as float32 numpy on the host."""
        return to_numpy(self.image_vectors(pixels))

    @torch.inference_mode()
    def image_vectors(self, pixels: torch.Tensor) -> torch.Tensor:
        """`encode_pixels`, left on the model's device."""
        if isinstance(pixels, np.ndarray):  # the builder's decode workers hand over numpy
            pixels = torch.from_numpy(pixels)
        if self.device.type == "cuda" and pixels.device.type == "cpu" and not pixels.is_pinned():
            pixels = pixels.pin_memory()  # page-locked: the copy below runs asynchronously
        pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
        features = self._graphs.get("image") or self._image_features
        return features(pixels)

    @property
    def graphed_towers(self) -> list[str]:
        """The towers replayed from CUDA graphs (see `capture_graphs`)."""
        return list(self._graphs)

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids on the device -> L2-normalized float32 vectors (what a text graph replays)."""
        trimmed = self.trims_padding and self.is_open_clip  # transformers models take any length
        feats = encode_text_trimmed(self.model, tokens) if trimmed else self.model.encode_text(tokens)
        return F.normalize(feats.float(), dim=-1)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.inference_mode()
    def capture_graphs(self, max_batch: int, capture: Capture = capture_cuda) -> list[str]:
        """Replay both towers from CUDA graphs captured at batch sizes 1, 2, 4, ... `max_batch`
        (text also at a few token lengths when padding can be trimmed); other sizes run eagerly.

        Each tower is checked against its eager self on real input before it is used; a tower
        whose capture fails or disagrees (cosine < 0.999) stays eager, with a warning, so
        this never stops a service from starting. Returns the towers now graphed.
        transformers models stay eager: their attention-mask code syncs with the host.
        """
        if not self.is_open_clip:
            log.info("CUDA graphs are for open_clip models; %s runs eagerly", self.info.family)
            return []
        batches = batch_buckets(max_batch)
        lengths = length_buckets(self.context_length) if self.trims_padding else [self.context_length]
        towers: list[tuple[str, Any, list[tuple[int, ...]], torch.dtype, list[torch.Tensor]]] = [
            ("text", self._text_features, [(n, length) for n in batches for length in lengths], torch.long,
             self._text_examples(max_batch)),
            ("image", self._image_features, [(n, 3, *self.image_size) for n in batches], self.dtype,
             self._image_examples(max_batch)),
        ]
        for tower, fn, shapes, dtype, examples in towers:
            try:
                graphs = BucketedGraphs(fn, shapes, dtype=dtype, device=self.device, capture=capture)
                _check_graphs(graphs, fn, examples)
            except Exception as exc:  # capture has many failure modes (sync in the model, memory); all mean eager
                log.warning("%s tower stays eager: CUDA graphs failed (%s: %s)", tower, type(exc).__name__, exc)
                continue
            self._graphs[tower] = graphs
        log.info("CUDA graphs for %s at batch sizes %s", ", ".join(self._graphs) or "no tower", batches)
        return self.graphed_towers

    def _text_examples(self, max_batch: int) -> list[torch.Tensor]:
        texts = ["a photo of a dog", "a red circle on a white background, drawn small in the upper left corner "
                 "next to three green stars and a blue square"]
        out = []
        for n in sorted({1, 3, max_batch}):
            tokens = self.tokenize([texts[i % 2] for i in range(n)])
            out.append((trim_padding(tokens, self.pad_id) if self.trims_padding else tokens).to(self.device))
        return out

    def _image_examples(self, max_batch: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return [torch.randn((n, 3, *self.image_size), generator=gen).to(self.device, self.dtype)
                for n in sorted({1, 3, max_batch})]

    # -- conveniences for offline jobs ------------------------------------------
    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run both towers once per batch size on dummy input, so that the first requests do
        not pay for lazy initialisation (kernel selection, allocator growth, oneDNN/cuBLAS
        handles). Outputs are discarded; the model has no state that this changes."""
        for n in batch_sizes:
            self.encode_tokens(self.tokenize(["a photo"] * n))
            self.encode_pixels(torch.zeros((n, 3, *self.image_size)))

    def set_threads(self, threads: int) -> None:
        """CPU threads for the model's math (torch's intra-op pool, shared by the process)."""
        torch.set_num_threads(threads)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = [self.encode_tokens(self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 128) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            pixels = torch.stack([self.preprocess(im) for im in images[i : i + batch_size]])
            out.append(self.encode_pixels(pixels))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @property
    def logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.exp().item()) if scale is not None else 100.0

    @property
    def logit_bias(self) -> float | None:
        """SigLIP's bias: set means the model scores pairs by sigmoid, not softmax over a batch."""
        bias = getattr(self.model, "logit_bias", None)
        return float(bias.item()) if isinstance(bias, torch.Tensor) else None


class FastClipTokenizer:
    """open_clip's `SimpleTokenizer` (the CLIP BPE), with the same output and a third of the cost.

    Three things make it cheaper, none changes a token (tests/service/test_tokenizer.py
    checks equality with open_clip on arbitrary unicode): printable-ASCII text skips
    ftfy (a no-op there), each word's ids are cached (open_clip caches only the BPE
    string), and the result is assembled in numpy instead of one torch call per text.
    Anything else (another clean function, a reduction mask, HF tokenizers) keeps
    open_clip's own tokenizer.
    """

    MAX_CACHED_WORDS = 200_000

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.context_length = int(tokenizer.context_length)
        self._sot = int(tokenizer.sot_token_id)
        self._eot = int(tokenizer.eot_token_id)
        self._word_ids: dict[str, tuple[int, ...]] = {}

    @classmethod
    def wrap(cls, tokenizer: Any) -> FastClipTokenizer | None:
        clean_lower = getattr(open_clip.tokenizer, "_clean_lower", None)
        if (
            isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)
            and clean_lower is not None
            and getattr(tokenizer, "clean_fn", None) is clean_lower
            and getattr(tokenizer, "reduction_fn", None) is None
            and getattr(tokenizer, "context_length", None)
        ):
            return cls(tokenizer)
        return None

    def _ids(self, word: str) -> tuple[int, ...]:
        ids = self._word_ids.get(word)
        if ids is None:
            tok = self._tok
            mapped = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
            ids = tuple(tok.encoder[piece] for piece in tok.bpe(mapped).split(" "))
            if len(self._word_ids) >= self.MAX_CACHED_WORDS:  # bounded: odd inputs cannot grow it forever
                self._word_ids.clear()
            self._word_ids[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for word in self._tok.pat.findall(bpe.clean(text)):  # open_clip's clean, skipping ftfy on plain ASCII
            out.extend(self._ids(word))
        return out

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(bpe.pack([self.encode(t) for t in texts], self.context_length, self._sot, self._eot))


def _supports_trimmed_text(model: torch.nn.Module) -> bool:
    """Cutting trailing padding is exact only for open_clip's own text transformer with a
    causal mask (later positions cannot influence earlier ones) and pooling at the EOT
    token (which trimming keeps). HF text towers and 'last'/'mean' pooling keep full length."""
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos")
        and getattr(model, "positional_embedding", None) is not None
    )


def _pad_id(tokenizer: Any) -> int:
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer holds a transformers one
    pad = getattr(inner, "pad_token_id", None) if isinstance(tokenizer, open_clip.tokenizer.HFTokenizer) else None
    return int(pad) if pad is not None else 0


def trim_padding(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Drop the columns after the longest sequence's last non-pad token."""
    used = (tokens != pad_id).any(dim=0).nonzero()
    length = int(used[-1]) + 1 if len(used) else 1
    return tokens[:, :length] if length < tokens.shape[1] else tokens


def encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    # open_clip's CLIP.encode_text, with the positional embedding and causal mask cut to
    # the (trimmed) sequence length. tests/service/test_model.py checks it against
    # encode_text on full-context tokens.
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = open_clip.transformer.text_global_pool(
        x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
    )
    if model.text_projection is not None:
        proj = model.text_projection
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


def _check_graphs(graphs: BucketedGraphs, eager: Any, examples: Sequence[torch.Tensor]) -> None:
    """Raise unless replaying `graphs` gives the eager vectors (cosine >= 0.999 per row) on
    each example, in turn: a later example also catches state left by an earlier one."""
    for x in examples:
        cosine = float((graphs(x) * eager(x)).sum(dim=-1).min())
        if not cosine >= 0.999:
            raise RuntimeError(f"replay differs from eager at input shape {tuple(x.shape)} (cosine {cosine:.4f})")


def load_model(spec: str, pretrained: str | None = None, device: str = "auto", dtype: str = "auto") -> ClipModel:
    """Load any open_clip spec (see module docstring) for inference.

    Raises `ModelLoadError` with a message that names the spec on any failure, so the
    service can refuse to start with a clear line instead of a traceback.
    """
    if exported.split_spec(spec.strip()) is not None:
        raise ModelLoadError(f"{spec}: an export; load it with clipsearch.model.load.load_model")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    resolved = resolve_spec(spec, pretrained)
    spec = resolved.spec
    if resolved.source is not None:
        wrapped, transform, text_tokenizer, fingerprint = hf.load(resolved.source)
        wrapped = wrapped.to(device=dev, dtype=torch_dtype).eval()
        log.info("loaded %s (transformers %s) on %s as %s", spec, wrapped.family, dev, torch_dtype)
        return ClipModel(wrapped, transform, text_tokenizer, spec=spec, pretrained=None,
                         fingerprint=fingerprint, device=dev, dtype=torch_dtype)
    try:
        fingerprint = model_fingerprint(spec, pretrained)
        with torch.random.fork_rng(devices=[]):
            if resolved.random_weights:
                torch.manual_seed(RANDOM_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(spec, device="cpu",
                                                                         **resolved.create_kwargs)
        tokenizer = open_clip.get_tokenizer(spec)
    except ModelLoadError:
        raise
    except Exception as exc:  # open_clip raises many kinds; all mean "cannot load this spec"
        raise ModelLoadError(f"cannot load model {spec!r} (pretrained={pretrained!r}): {exc}") from exc
    model = model.to(device=dev, dtype=torch_dtype).eval()
    log.info("loaded %s (pretrained=%s) on %s as %s", spec, pretrained, dev, torch_dtype)
    return ClipModel(
        model,
        preprocess,
        tokenizer,
        spec=spec,
        pretrained=pretrained,
        fingerprint=fingerprint,
        device=dev,
        dtype=torch_dtype,
    )


@dataclass(frozen=True)
class ResolvedSpec:
    """A model spec resolved once, for inference and training alike: a transformers checkpoint
    (`source` set) or an open_clip one (`spec` normalized, with open_clip's load arguments)."""

    spec: str
    source: str | None = None  # what transformers loads (a hub id or a directory)
    create_kwargs: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False


def resolve_spec(spec: str, pretrained: str | None) -> ResolvedSpec:
    """Check `spec` (and `pretrained`) and say how to load it; raises `ModelLoadError` naming it."""
    spec = spec.strip()
    if not spec:
        raise ModelLoadError("model spec is empty")
    source = transformers_source(spec)
    if source is not None:
        _no_pretrained(spec, pretrained)
        return ResolvedSpec(_normalized(spec, source), source=source)
    if spec.startswith(LOCAL_DIR):
        directory = Path(spec[len(LOCAL_DIR) :]).expanduser()
        if not (directory / CONFIG_NAME).is_file():
            raise ModelLoadError(f"{spec}: {directory / CONFIG_NAME} not found")
        if _find_weights(directory) is None:
            raise ModelLoadError(f"{spec}: no weights file in {directory}")
        return ResolvedSpec(LOCAL_DIR + str(directory.resolve()), create_kwargs=local_text_tower(directory))
    if spec.startswith(HF_HUB):
        return ResolvedSpec(spec)
    if spec.replace("/", "-") not in open_clip.list_models():
        raise ModelLoadError(unknown_model(spec))
    if pretrained is None or pretrained.strip().lower() in _RANDOM:
        return ResolvedSpec(spec, create_kwargs={"pretrained_text": False}, random_weights=True)
    return ResolvedSpec(spec, create_kwargs={"pretrained": pretrained})


def transformers_source(spec: str) -> str | None:
    """What transformers loads for `spec` (a hub id or a directory), or None for an open_clip spec."""
    if spec.startswith(hf.PREFIX):
        rest = spec[len(hf.PREFIX) :].strip()
        if not rest:
            raise ModelLoadError("hf: needs a hub id (hf:org/repo) or a directory (hf:/path)")
        path = Path(rest).expanduser()
        return str(path.resolve()) if path.is_dir() else rest
    if spec.startswith(LOCAL_DIR):
        directory = Path(spec[len(LOCAL_DIR) :]).expanduser()
        if not (directory / CONFIG_NAME).is_file() and hf.is_transformers_dir(directory):
            return str(directory.resolve())
    return None


def _no_pretrained(spec: str, pretrained: str | None) -> None:
    if pretrained is not None and pretrained.strip().lower() not in _RANDOM:
        raise ModelLoadError(f"{spec}: --pretrained is for open_clip names; a transformers checkpoint carries "
                             "its own weights (name another with hf:org/repo or hf:/path)")


def _normalized(spec: str, source: str) -> str:
    """The spec as manifests and `/healthz` show it: directories made absolute."""
    if Path(source).is_absolute():
        return (LOCAL_DIR if spec.startswith(LOCAL_DIR) else hf.PREFIX) + source
    return hf.PREFIX + source


def local_text_tower(directory: Path) -> dict[str, Any]:
    """open_clip overrides that build a Hugging Face text tower (xlm-roberta, NLLB, ...) from the
    checkpoint directory itself, so that it loads offline.

    Such a checkpoint names its tower by hub id (`text_cfg.hf_model_name`); open_clip already
    reads the tokenizer from the directory, but asks the hub for the tower's config. When the
    directory holds that config (`config.json`, as `save_local_dir` writes it), use it.
    """
    try:
        text_cfg = json.loads((directory / CONFIG_NAME).read_text())["model_cfg"].get("text_cfg", {})
    except (OSError, ValueError, KeyError, AttributeError):
        return {}  # open_clip reports an unreadable config itself
    if not text_cfg.get("hf_model_name") or not (directory / "config.json").is_file():
        return {}
    return {"text_cfg": {**text_cfg, "hf_model_name": str(directory.resolve()), "hf_model_pretrained": False}}


def save_local_dir(
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    directory: str | os.PathLike[str],
    preprocess_cfg: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write `model` as a `local-dir:` checkpoint (config + safetensors), atomically.

    The directory appears complete or not at all; an existing one is replaced whole. A model
    with a Hugging Face text tower also gets that tower's config and (given open_clip's
    `HFTokenizer`) its tokenizer files, so the checkpoint loads with no hub.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    visual = getattr(model, "visual", None)
    pp = dict(preprocess_cfg or {})
    if visual is not None:
        pp.setdefault("mean", list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN))
        pp.setdefault("std", list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD))
    config = {"model_cfg": model_cfg, "preprocess_cfg": pp}
    with atomic_dir(directory) as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME))
        os.chmod(tmp / WEIGHTS_NAME, 0o666 & ~umask())  # safetensors writes 0600
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        text_config = getattr(getattr(model, "text", None), "config", None)
        if text_config is not None and hasattr(text_config, "save_pretrained"):
            text_config.save_pretrained(tmp)
        inner: Any = getattr(tokenizer, "tokenizer", None)
        if isinstance(tokenizer, open_clip.tokenizer.HFTokenizer) and hasattr(inner, "save_pretrained"):
            inner.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return directory


@dataclass
class TrainableClip:
    """What fine-tuning needs: the fp32 torch model, both transforms, tokenizer and config
    (`model_cfg` is None for a transformers model, whose config travels with it)."""

    model: torch.nn.Module
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    model_cfg: dict[str, Any] | None
    preprocess_cfg: dict[str, Any]
    spec: str
    pretrained: str | None

    def save(self, directory: str | os.PathLike[str], extra_files: dict[str, bytes] | None = None) -> Path:
        """Write the current weights as a checkpoint `local-dir:` loads, atomically: open_clip's
        layout for an open_clip model, transformers' `save_pretrained` layout for one of those."""
        if isinstance(self.model, hf.HFClip):
            return hf.save(self.model, self.tokenizer, self.preprocess_val, directory, extra_files)
        if self.model_cfg is None:
            raise ModelLoadError(f"{self.spec}: no open_clip config to save with these weights")
        return save_local_dir(self.model, self.model_cfg, directory, self.preprocess_cfg, extra_files, self.tokenizer)

    def as_clip_model(self, device: torch.device | None = None) -> ClipModel:
        """An inference view of the same weights (shared, not copied), as the service sees them."""
        dev = device or next(self.model.parameters()).device
        return ClipModel(self.model, self.preprocess_val, self.tokenizer, spec=self.spec, pretrained=self.pretrained,
                         fingerprint="in-training", device=dev, dtype=torch.float32)


def _model_config(spec: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if spec.startswith(LOCAL_DIR):
        cfg = json.loads((Path(spec[len(LOCAL_DIR) :]) / CONFIG_NAME).read_text())
        return cfg["model_cfg"], cfg.get("preprocess_cfg", {})
    if spec.startswith(HF_HUB):
        from open_clip.factory import _get_hf_config

        cfg = _get_hf_config(spec[len(HF_HUB) :])
        return cfg["model_cfg"], cfg.get("preprocess_cfg", {})
    cfg = open_clip.get_model_config(spec.replace("/", "-"))
    if cfg is None:
        raise ModelLoadError(unknown_model(spec))
    return cfg, {}


def unknown_model(spec: str) -> str:
    """Why `spec` names no model, with the likely fix."""
    if Path(spec).expanduser().is_dir():
        return f"unknown open_clip model {spec!r}: for a checkpoint directory, write local-dir:{spec}"
    return f"unknown open_clip model {spec!r}; see `open_clip.list_models()`, or use hf-hub:org/repo or local-dir:/path"


def load_for_training(spec: str, pretrained: str | None = None, device: str = "auto", seed: int = 0
                      ) -> TrainableClip:
    """Load a spec for fine-tuning (fp32, train transforms too). Random specs are seeded by `seed`."""
    dev = resolve_device(device)
    resolved = resolve_spec(spec, pretrained)
    spec = resolved.spec
    if resolved.source is not None:
        # The family's processor has no training augmentation: both transforms are the same.
        wrapped, transform, text_tokenizer, _ = hf.load(resolved.source)
        return TrainableClip(wrapped.to(dev), transform, transform, text_tokenizer, None, {}, spec, None)
    try:
        model_cfg, pp_cfg = _model_config(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                spec, device="cpu", **resolved.create_kwargs)
        tokenizer = open_clip.get_tokenizer(spec)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {spec!r} (pretrained={pretrained!r}): {exc}") from exc
    return TrainableClip(model.to(dev), preprocess_train, preprocess_val, tokenizer, model_cfg, pp_cfg, spec,
                         pretrained)
