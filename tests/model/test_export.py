"""`clipsearch export` and the `onnx:DIR` runtime behind the model seam: on every family, the
export's vectors against the torch model's on the same checkpoint (cosine >= 0.9999 per
vector, texts long and short, images through the same preprocessing, bit for bit); the
export keeps the source's fingerprint, so an index built with the torch model serves with
it, and the builder runs it; int8; a damaged export and an unexportable model refused with
one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipsearch.core.errors import ModelLoadError
from clipsearch.model.base import Model
from clipsearch.model.clip import ClipModel
from clipsearch.model.export import export
from clipsearch.model.load import load_model
from tests.builder.test_build import load_vectors, write_corpus
from tests.conftest import HF_FAMILIES, encode_image, make_image

pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["a red circle", "two blue squares on a grey background", "", "shape " * 60]


def _check_same_vectors(torch_model: ClipModel, exported: Model, min_cosine: float = 0.9999) -> None:
    texts = TEXTS if torch_model.info.family == "open_clip" else TEXTS[:2] + TEXTS[3:]
    for batch in (texts, texts[:2]):  # the second: short texts only, the padding cut where the model allows
        a, b = torch_model.encode_tokens(torch_model.tokenize(batch)), exported.encode_tokens(exported.tokenize(batch))
        assert (a * b).sum(1).min() >= min_cosine
    assert exported.trims_padding == torch_model.trims_padding
    images = [make_image(i, size) for i, size in enumerate(((96, 80), (30, 200), (300, 301)))]
    pa = np.stack([np.asarray(torch_model.preprocess(im)) for im in images])
    pb = np.stack([np.asarray(exported.preprocess(im)) for im in images])
    if torch_model.info.family == "open_clip":
        np.testing.assert_array_equal(pa, pb)  # the same preprocessing, rebuilt from the export's files
    else:  # transformers' torchvision processor against its PIL form (test_portable.py: equal to transformers')
        np.testing.assert_allclose(pa, pb, atol=0.05)
    a, b = torch_model.encode_pixels(torch.from_numpy(pa)), exported.encode_pixels(pb)
    assert (a * b).sum(1).min() >= min_cosine


def test_open_clip_export_serves_the_same_vectors(tiny_spec, tiny_model, tmp_path) -> None:
    out = export(tiny_spec, tmp_path / "export")
    model = load_model(f"onnx:{out}", device="cpu")
    _check_same_vectors(tiny_model, model)
    assert (model.info.fingerprint, model.info.runtime, model.dim) == (tiny_model.info.fingerprint, "onnx", 64)
    assert (model.logit_scale, model.logit_bias) == pytest.approx((tiny_model.logit_scale, tiny_model.logit_bias))
    assert model.count_tokens(TEXTS) == tiny_model.count_tokens(TEXTS)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["source_spec"] == tiny_model.info.spec and set(manifest["files"]) >= {"text.onnx", "image.onnx"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left behind


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_transformers_families_export(family, hf_spec, tmp_path) -> None:
    source = load_model(hf_spec(family), device="cpu")
    model = load_model(f"onnx:{export(hf_spec(family), tmp_path / family)}", device="cpu")
    _check_same_vectors(source, model)
    assert model.info.family == family and model.logit_bias == pytest.approx(source.logit_bias)


def test_int8_is_smaller_and_close(tiny_spec, tiny_model, tmp_path) -> None:
    fp32 = export(tiny_spec, tmp_path / "fp32")
    int8 = export(tiny_spec, tmp_path / "int8", quantize="int8")
    assert (int8 / "image.onnx").stat().st_size < (fp32 / "image.onnx").stat().st_size
    import onnx

    graphs = {name: onnx.load(str(int8 / name), load_external_data=False) for name in ("text.onnx", "image.onnx")}
    ops = {op.op_type for graph in graphs.values() for op in graph.graph.node}
    assert "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops
    assert "ConvInteger" not in ops  # the patch embedding stays fp32 (faster)
    referenced = {e.value for g in graphs.values() for t in g.graph.initializer for e in t.external_data
                  if e.key == "location"}
    stale = [p.name for p in int8.glob("*.data") if p.name not in referenced]
    assert not stale  # the fp32 weights are not left beside the int8 graph
    model = load_model(f"onnx:{int8}", device="cpu")
    _check_same_vectors(tiny_model, model, min_cosine=0.95)  # a random tiny model; the demo's recall: bench/


def test_a_changed_export_and_an_unexportable_model_are_refused(tiny_spec, tmp_path, monkeypatch) -> None:
    out = export(tiny_spec, tmp_path / "export")
    (out / "text.onnx").write_bytes((out / "text.onnx").read_bytes()[:-10])
    with pytest.raises(ModelLoadError, match=r"text\.onnx is missing or changed"):
        load_model(f"onnx:{out}", device="cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::foo' to ONNX opset version 17 is not supported.\nmore")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ModelLoadError) as err:
        export(tiny_spec, tmp_path / "again")
    assert str(err.value) == ("cannot export the text tower to ONNX: Exporting the operator 'aten::foo' to ONNX "
                              "opset version 17 is not supported.")
    assert not (tmp_path / "again").exists()


async def test_an_index_built_with_torch_serves_with_the_export(tiny_spec, tiny_model, tmp_path, make_client) -> None:
    corpus = tmp_path / "c.tsv"
    rows = write_corpus(corpus, 10)
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "clipsearch", "export", "--model", tiny_spec, "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and f"--model onnx:{out}" in r.stdout, r.stderr
    for name, spec in (("torch", tiny_spec), ("onnx", f"onnx:{out}")):
        r = subprocess.run([sys.executable, "-m", "clipsearch", "index", "build", "-i", str(corpus), "-o",
                            str(tmp_path / name), "--model", spec, "--device", "cpu", "--index-type", "flat",
                            "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
    versions = [next((tmp_path / name / "versions").iterdir()) for name in ("torch", "onnx")]
    for modality in ("image", "text"):
        (a, items_a), (b, items_b) = (load_vectors(v, modality) for v in versions)
        assert [i["id"] for i in items_a] == [i["id"] for i in items_b]
        assert (a * b).sum(1).min() >= 0.9999
    onnx_model = load_model(f"onnx:{out}", device="cpu")
    async with make_client(onnx_model, index_dir=tmp_path / "torch") as client:
        assert (await client.get("/readyz")).status_code == 200  # the same fingerprint: accepted
        r = await client.post("/embed", json={"texts": [rows[0][0]], "images": [rows[0][1]]})
        got = r.json()
        want = tiny_model.encode_tokens(tiny_model.tokenize([rows[0][0]]))
        assert float(np.dot(got["texts"][0], want[0])) >= 0.9999
        hits = (await client.post("/search/image", json={"image": encode_image(make_image(503)), "k": 3})).json()
        assert len(hits["results"]) == 3


def test_cli_export_fails_with_one_line(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "clipsearch", "export", "--model", "no-such-model", "-o",
                        str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_openvino_runs_its_ir_and_an_onnx_export(tiny_spec, tiny_model, tmp_path) -> None:
    pytest.importorskip("openvino")
    ir = export(tiny_spec, tmp_path / "ir", fmt="openvino")
    assert {"text.xml", "image.xml"} <= {p.name for p in ir.iterdir()}
    for directory in (ir, export(tiny_spec, tmp_path / "onnx")):  # OpenVINO reads ONNX graphs as well
        model = load_model(f"openvino:{directory}", device="cpu")
        assert model.info.runtime == "openvino"
        _check_same_vectors(tiny_model, model)


def test_onnx_providers_are_chosen_once_and_named_ones_must_exist(monkeypatch) -> None:
    from clipsearch.model.exported import PROVIDERS_ENV, onnx_providers

    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(False, every) == ["CPUExecutionProvider"]
    assert onnx_providers(True, every) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(True, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    monkeypatch.setenv(PROVIDERS_ENV, "TensorrtExecutionProvider, CUDAExecutionProvider")
    assert onnx_providers(False, every) == every
    with pytest.raises(ModelLoadError, match="TensorrtExecutionProvider, CUDAExecutionProvider not in this ONNX"):
        onnx_providers(True, ["CPUExecutionProvider"])


def _cuda_provider() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(not _cuda_provider(), reason="needs onnxruntime-gpu and a GPU")
def test_an_export_on_the_cuda_provider_serves_the_same_vectors(tiny_spec, tiny_model, tmp_path) -> None:
    out = export(tiny_spec, tmp_path / "export")
    model = load_model(f"onnx:{out}", device="cuda")
    _check_same_vectors(tiny_model, model)


def test_evaluate_runs_an_export_as_the_torch_model(tiny_spec, tiny_model, tmp_path) -> None:
    from clipsearch.finetune.evaluate import evaluate, evaluate_set
    from clipsearch.finetune.synth import write_tsv
    from clipsearch.inputs.pairs import PairFile
    from clipsearch.inputs.retrieval import RetrievalSet

    write_tsv(tmp_path / "valid.tsv", 40, seed=5, image_size=64)
    model = load_model(f"onnx:{export(tiny_spec, tmp_path / 'export')}", device="cpu")
    pairs = PairFile(tmp_path / "valid.tsv")
    want, got = evaluate(tiny_model, pairs), evaluate(model, pairs)
    assert got["t2i"] == want["t2i"] and got["i2t"] == want["i2t"] and got["counts"] == want["counts"]
    images = [make_image(i, (40 + 7 * i, 64)) for i in range(12)]
    data = RetrievalSet(images=[(str(i), lambda im=im: im) for i, im in enumerate(images)],
                        texts=[f"picture {i}" for i in range(12)], pairs=[(i, i) for i in range(12)])
    want, got = evaluate_set(tiny_model, data), evaluate_set(model, data)
    assert got["t2i"] == want["t2i"] and got["i2t"] == want["i2t"]


@pytest.mark.parametrize("batch_first", [True, False])
def test_the_exports_batch_first_attention_equals_the_module(batch_first) -> None:
    from clipsearch.model.export import _SelfAttention

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    bool_mask = torch.rand(5, 5) > 0.7
    bool_mask.fill_diagonal_(False)
    masks = [None, torch.full((5, 5), float("-inf")).triu(1), torch.randn(3 * 4, 5, 5), bool_mask]
    with torch.no_grad():
        for mask in masks:
            want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
            got = _SelfAttention(mha)(x, x, x, need_weights=False, attn_mask=mask)[0]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        other = torch.randn_like(x)  # cross-attention goes to the module itself
        torch.testing.assert_close(_SelfAttention(mha)(x, other, other)[0], mha(x, other, other)[0])
