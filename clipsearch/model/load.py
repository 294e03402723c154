"""The seam's entry: `load_model(spec)` for every kind of model clipsearch serves.

An export (`onnx:DIR`, `openvino:DIR`) loads here without importing torch; every other spec
(open_clip names, `hf-hub:`, `local-dir:`, `hf:`) loads through `clip.load_model`, on torch.
The runtime is chosen here, once; what comes back is a `base.Model` either way.
"""

from __future__ import annotations

from clipsearch.core.errors import ModelLoadError
from clipsearch.model import exported
from clipsearch.model.base import Model


def load_model(spec: str, pretrained: str | None = None, device: str = "auto", dtype: str = "auto") -> Model:
    """Load any model spec for inference; `ModelLoadError` names the spec on any failure."""
    if exported.split_spec(spec.strip()) is not None:
        return exported.load_model(spec, pretrained, device)
    try:
        from clipsearch.model.clip import load_model as load_torch_model
    except ImportError as exc:  # a torch-free install (the onnx / openvino extras)
        missing = exc.name or "torch"
        raise ModelLoadError(f"{spec}: this model runs on torch, which is not installed ({missing}): install "
                             "clipsearch[cpu] or clipsearch[gpu], or serve an export of it (onnx:DIR, "
                             "docs/runtimes.md)") from None
    return load_torch_model(spec, pretrained, device, dtype)
