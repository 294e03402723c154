"""`clipsearch export`: a model the seam loads, written as two ONNX graphs (text ids ->
vector, pixels -> vector, L2-normalized, any batch size) with what serving needs beside them:
the tokenizer, the preprocessing config, and a manifest (`export.json`: family, dimension,
context length, image size, logit scale and bias, the source model's spec and fingerprint,
each file's SHA-256). Written atomically: a directory appears whole or not at all.

`--quantize int8` quantizes the linear layers' weights dynamically (ONNX Runtime's
`quantize_dynamic`); `--format openvino` writes OpenVINO's IR from the ONNX graphs as well.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from clipsearch.core.errors import ModelLoadError
from clipsearch.core.fsutil import atomic_dir, sha256_file
from clipsearch.model import hf, portable
from clipsearch.model.clip import ClipModel, encode_text_trimmed, load_model, trim_padding
from clipsearch.model.exported import MANIFEST, OPSET, ExportManifest, Format, Quantize

log = logging.getLogger(__name__)

class _Text(torch.nn.Module):
    """Ids -> vectors; for a model whose padding can be cut (open_clip's causal mask and
    end-token pooling; a transformers tower's attention mask), ids of any length up to the
    context, as the torch runtime trims them."""

    def __init__(self, model: ClipModel) -> None:
        super().__init__()
        self.inner = model.model
        self.trimmed = model.trims_padding
        self.open_clip = model.is_open_clip

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.trimmed and self.open_clip:
            features = encode_text_trimmed(self.inner, ids)
        else:
            features = self.inner.encode_text(ids)
        return F.normalize(features.float(), dim=-1)


class _Image(torch.nn.Module):
    def __init__(self, model: ClipModel) -> None:
        super().__init__()
        self.inner = model.model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.inner.encode_image(pixels).float(), dim=-1)


class _SelfAttention(torch.nn.Module):
    """`nn.MultiheadAttention`'s self-attention written batch-first, for the exported graph:
    one projection, one head split and one merge, where the module's own code path (seq-first
    inside) traces into three times as many transposes. The same arithmetic (vectors within
    1e-5); 3-5% faster on ONNX Runtime (bench/runtimes.py). Any other call (cross-attention, a
    key padding mask, separate q/k/v weights) goes to the module itself."""

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        mha = self.mha
        if (not (query is key is value) or key_padding_mask is not None or kwargs or mha.in_proj_weight is None
                or mha.bias_k is not None or mha.add_zero_attn):
            return mha(query, key, value, need_weights=need_weights, attn_mask=attn_mask,
                       key_padding_mask=key_padding_mask, **kwargs)
        x = query if mha.batch_first else query.transpose(0, 1)
        b, n, d = x.shape
        heads = mha.num_heads
        qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).reshape(b, n, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        scores = (q * (d // heads) ** -0.5) @ k.transpose(-1, -2)
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # (batch * heads, n, n), batch-major as nn.MultiheadAttention reads it
                attn_mask = attn_mask.view(b, heads, n, -1)
            scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else \
                scores + attn_mask
        out = mha.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))
        return (out if mha.batch_first else out.transpose(0, 1)), None


def _batch_first_attention(module: torch.nn.Module) -> None:
    """Every `nn.MultiheadAttention` in `module` behind `_SelfAttention`, in place."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.MultiheadAttention):
                setattr(parent, name, _SelfAttention(child))


def export(spec: str, output: str | Path, *, pretrained: str | None = None, fmt: Format = "onnx",
           quantize: Quantize = "none") -> Path:
    """Export `spec` to `output` (replaced whole if it exists); returns the directory."""
    model = load_model(spec, pretrained, device="cpu", dtype="fp32")
    _batch_first_attention(model.model)
    output = Path(output)
    manifest = ExportManifest(
        family=model.info.family, dim=model.dim, context_length=model.context_length,
        image_size=model.image_size, logit_scale=model.logit_scale, logit_bias=model.logit_bias,
        pad_id=int(model.pad_id), source_spec=model.info.spec, source_fingerprint=model.info.fingerprint,
        quantize=quantize, format=fmt)
    with atomic_dir(output) as tmp:
        _tokenizer_files(model, tmp, manifest)
        examples = model.tokenize(["a photo of a dog", "two red circles"])
        pixels = torch.zeros(2, 3, *model.image_size)
        text = _Text(model)
        manifest.trims_padding = text.trimmed
        for name, module, example, input_name in (
                ("text", text, trim_padding(examples, model.pad_id) if text.trimmed else examples, "ids"),
                ("image", _Image(model), pixels, "pixels")):
            path = tmp / f"{name}.onnx"
            _onnx(module.eval(), example, path, input_name, name, model.context_length if module is text and
                  text.trimmed else None)
            if quantize == "int8":
                _int8(path)
            if fmt == "openvino":
                _openvino(path, tmp / f"{name}.xml")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest.files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in files}
        (tmp / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    log.info("exported %s to %s (%s%s)", model.info.spec, output, fmt, ", int8" if quantize == "int8" else "")
    return output


def _onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, tower: str,
          max_length: int | None) -> None:
    """Any batch size; with `max_length`, any sequence length up to it too (torch.export's
    exporter: the tracing one fixes the attention's reshapes to the example's length)."""
    try:
        if max_length is not None:
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            length = torch.export.Dim("length", min=2, max=max_length)
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
                torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                                  output_names=["vectors"], dynamic_shapes=({0: batch, 1: length},), dynamo=True,
                                  verbose=False)
            return
        # with autograd on: PyTorch's attention fast path (taken under no_grad) has no ONNX form
        with torch.inference_mode(False), torch.enable_grad():
            torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=["vectors"],
                              dynamic_axes={input_name: {0: "batch"}, "vectors": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
    except Exception as exc:  # the exporter's errors are long; the first line says what failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot export the {tower} tower to ONNX: {first}") from exc


def _int8(path: Path) -> None:
    """The MatMul and Gemm weights to int8, activations quantized on the fly. Convolutions (a
    ViT's patch embedding, a ResNet's layers) stay fp32: ONNX Runtime's ConvInteger runs
    slower than its fp32 Conv (measured: 157 against 55 ms a batch of 32 on ViT-B-32), which
    cost int8 a sixth of its gain."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_suffix(".int8.onnx")
    quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    before = _external_files(onnx.load(str(path), load_external_data=False))
    kept = _external_files(onnx.load(str(quantized), load_external_data=False))
    quantized.replace(path)
    for name in before - kept:  # the fp32 weights the quantized graph no longer reads
        (path.parent / name).unlink(missing_ok=True)


def _external_files(model: Any) -> set[str]:
    return {entry.value for tensor in model.graph.initializer if tensor.data_location == 1
            for entry in tensor.external_data if entry.key == "location"}


def _openvino(onnx_path: Path, xml: Path) -> None:
    try:
        import openvino as ov
    except ImportError:
        raise ModelLoadError("--format openvino needs the openvino package: pip install openvino") from None
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml))


def _tokenizer_files(model: ClipModel, directory: Path, manifest: ExportManifest) -> None:
    """The tokenizer and preprocessing, as files that rebuild them without the weights; a
    transformers-family tokenizer and image processor in their torch-free form (`portable`)
    where that gives the same ids and pixels on probes, else as transformers files."""
    tok = model.tokenizer
    if isinstance(tok, open_clip.tokenizer.SimpleTokenizer):
        manifest.tokenizer = "open_clip"
        vocab = Path(open_clip.tokenizer.default_bpe())
        shutil.copyfile(vocab, directory / "bpe_simple_vocab_16e6.txt.gz")
    elif isinstance(tok, (open_clip.tokenizer.HFTokenizer, hf.TextTokenizer)):
        manifest.tokenizer = "hf"
        tok.tokenizer.save_pretrained(directory / "tokenizer")
        if isinstance(tok, open_clip.tokenizer.HFTokenizer):  # an open_clip model's HF text tower
            clean = getattr(getattr(tok, "clean_fn", None), "__name__", "_clean_whitespace")
            manifest.tokenizer_options = {"open_clip": True, "clean": clean.removeprefix("_clean_"),
                                          "strip_sep_token": bool(getattr(tok, "strip_sep_token", False))}
        _portable_tokenizer(tok, directory, manifest)
    else:
        raise ModelLoadError(f"cannot export {model.info.spec}: its tokenizer ({type(tok).__name__}) has no "
                             "file form")
    if isinstance(model.preprocess_transform, hf.ImageTransform):
        model.preprocess_transform.processor.save_pretrained(directory / "processor")
        _portable_processor(model.preprocess_transform.processor, directory, manifest)
    else:
        cfg = getattr(model.model.visual, "preprocess_cfg", None)
        if not cfg:
            raise ModelLoadError(f"cannot export {model.info.spec}: its preprocessing has no config")
        manifest.preprocess = dict(cfg)


PROBE_TEXTS = ["a photo of a dog", "Two RED circles &amp; a   square!", "", "一只猫坐在垫子上", "café naïve résumé",
               "<|endoftext|> [SEP] </s>", "word " * 200]


def _portable_tokenizer(tok: Any, directory: Path, manifest: ExportManifest) -> None:
    open_clip_options = manifest.tokenizer_options if manifest.tokenizer_options.get("open_clip") else None
    options = portable.describe_tokenizer(tok.tokenizer, open_clip_options)
    path = directory / "tokenizer" / "tokenizer.json"
    if options is None or not path.is_file():
        log.warning("%s: this tokenizer has no tokenizers form; serving the export needs transformers",
                    type(tok.tokenizer).__name__)
        return
    ported = portable.PortableTokenizer(path, int(tok.context_length), options)
    want, got = np.asarray(tok(PROBE_TEXTS)), ported(PROBE_TEXTS)
    if want.shape != got.shape or not np.array_equal(want, got):
        log.warning("%s: its tokenizers form gives other ids; serving the export needs transformers",
                    type(tok.tokenizer).__name__)
        return
    manifest.tokenizer, manifest.tokenizer_options = "tokenizers", options


def _portable_processor(processor: Any, directory: Path, manifest: ExportManifest) -> None:
    cfg = portable.describe_processor(processor)
    reference = None
    if cfg is not None:
        try:
            reference = hf._transformers().AutoImageProcessor.from_pretrained(str(directory / "processor"),
                                                                              backend="pil")
        except Exception as exc:
            log.debug("no PIL image processor: %s", exc)
    if cfg is None or reference is None:
        log.warning("%s: this image processor has no torch-free form; serving the export needs transformers",
                    type(processor).__name__)
        return
    transform = portable.ProcessorTransform(cfg)
    rng = np.random.default_rng(0)
    for w, h in ((96, 80), (30, 200), (300, 301), (7, 5), (640, 480)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = np.asarray(reference(images=image, return_tensors="np")["pixel_values"][0], np.float32)
        if not np.array_equal(want, transform(image)):
            log.warning("%s: its torch-free form gives other pixels; serving the export needs transformers",
                        type(processor).__name__)
            return
    manifest.preprocess = cfg
