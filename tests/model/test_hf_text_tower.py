"""open_clip models with a Hugging Face text tower (the multilingual xlm-roberta / NLLB kind),
loaded offline from a checkpoint directory that holds the tower's config and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import tokenizers
import torch
import transformers
from safetensors.torch import load_file

from clipsearch.model.clip import WEIGHTS_NAME, load_for_training, load_model, save_local_dir
from tests.conftest import make_image


def _xlmr_tokenizer(texts: list[str]) -> transformers.PreTrainedTokenizerFast:
    """An XLM-R-shaped tokenizer (<s> text </s>, <pad> = 1) trained here on English and Chinese."""
    uni = tokenizers.Tokenizer(tokenizers.models.Unigram())
    uni.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    uni.decoder = tokenizers.decoders.Metaspace()
    uni.train_from_iterator(texts, tokenizers.trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    uni.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=uni, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, hf_texts) -> tuple[Path, dict]:
    """A random open_clip CustomTextCLIP with an XLM-R text tower, saved as a hub-named checkpoint
    would be (text_cfg.hf_model_name = "xlm-roberta-base"), tower config and tokenizer beside it."""
    tower = tmp_path_factory.mktemp("tower")
    tok = _xlmr_tokenizer(hf_texts)
    tok.save_pretrained(tower)
    transformers.XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=40, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2).save_pretrained(tower)
    text_cfg = {"hf_model_name": str(tower), "hf_tokenizer_name": str(tower), "hf_pooler_type": "mean_pooler",
                "hf_proj_type": "linear", "context_length": 32, "hf_model_pretrained": False}
    cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                           "patch_size": 8}, "text_cfg": text_cfg}
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**cfg).eval()
    saved = {**cfg, "text_cfg": {**text_cfg, "hf_model_name": "xlm-roberta-base",
                                 "hf_tokenizer_name": "xlm-roberta-base"}}
    saved["text_cfg"].pop("hf_model_pretrained")
    directory = tmp_path_factory.mktemp("ckpt") / "xlmr-clip"
    tokenizer = open_clip.tokenizer.HFTokenizer(str(tower), context_length=32)
    save_local_dir(model, saved, directory, tokenizer=tokenizer)
    return directory, cfg


def _direct(directory: Path, cfg: dict, texts: list[str]) -> np.ndarray:
    """The reference: open_clip's own classes on the same weights and the tower's own tokenizer."""
    model = open_clip.CustomTextCLIP(**cfg).eval()
    model.load_state_dict(load_file(directory / WEIGHTS_NAME))
    tokenizer = open_clip.tokenizer.HFTokenizer(str(directory), context_length=32)
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1).numpy()


def test_loads_offline_and_equals_open_clip(checkpoint) -> None:
    directory, cfg = checkpoint
    assert json.loads((directory / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"][
        "hf_model_name"] == "xlm-roberta-base"  # a hub id: only the local config.json makes this offline
    model = load_model(f"local-dir:{directory}", device="cpu")
    assert model.info.family == "open_clip" and not model.trims_padding
    texts = ["a red circle", "白色背景有两个绿色星形", "", "three small blue squares on the left " * 4]
    got = model.encode_texts(texts)
    assert (got * _direct(directory, cfg, texts)).sum(1).min() >= 0.9999
    assert model.pad_id == 1
    assert model.count_tokens(texts) == int((model.tokenize(texts) != 1).sum())
    assert model.encode_images([make_image(0)]).shape == (1, 24)


def test_fine_tuned_copy_keeps_the_tower_offline(checkpoint, tmp_path: Path) -> None:
    directory, cfg = checkpoint
    trainable = load_for_training(f"local-dir:{directory}", device="cpu")
    with torch.no_grad():
        trainable.model.logit_scale.add_(0.5)  # "trained"
    trainable.save(tmp_path / "tuned")
    assert {"config.json", "open_clip_config.json", WEIGHTS_NAME} <= {p.name for p in (tmp_path / "tuned").iterdir()}
    tuned = load_model(f"local-dir:{tmp_path / 'tuned'}", device="cpu")
    assert tuned.logit_scale == pytest.approx(load_model(f"local-dir:{directory}", device="cpu").logit_scale
                                              * np.exp(0.5), rel=1e-5)
    texts = ["两个蓝色正方形", "a star"]
    np.testing.assert_allclose(tuned.encode_texts(texts), _direct(directory, cfg, texts), atol=1e-5)


def test_exports_with_a_torch_free_tokenizer(checkpoint, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from clipsearch.model.export import export
    from clipsearch.model.load import load_model as load_any
    from clipsearch.model.portable import PortableTokenizer

    directory, _ = checkpoint
    source = load_model(f"local-dir:{directory}", device="cpu")
    out = export(f"local-dir:{directory}", tmp_path / "export")
    assert json.loads((out / "export.json").read_text())["tokenizer"] == "tokenizers"
    exported = load_any(f"onnx:{out}", device="cpu")
    assert isinstance(exported.tokenizer, PortableTokenizer)
    texts = ["a red circle", "白色背景有两个绿色星形", "", "  Two   RED &amp; circles ", "square " * 50]
    np.testing.assert_array_equal(exported.tokenize(texts), source.tokenize(texts).numpy())
    assert (exported.encode_texts(texts) * source.encode_texts(texts)).sum(1).min() >= 0.9999
