"""Tiny models and indexes for tests and benchmarks.

No weights are downloaded: `write_tiny_model` builds the model with seeded random
weights and saves it as a `local-dir:` checkpoint through the model seam's writer.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from clipsearch.index.format import (
    Modality,
    ModelRef,
    build_faiss_index,
    new_version_name,
    publish_version,
    staging_dir,
    write_version,
)
from clipsearch.model.clip import MODEL_CONFIG_DIR, save_local_dir

TINY_MODEL_NAME = "clipsearch-tiny"
TINY_MODEL_CFG: dict[str, Any] = json.loads((MODEL_CONFIG_DIR / f"{TINY_MODEL_NAME}.json").read_text())


def tiny_model_cfg(image_size: int = 64, embed_dim: int = 64) -> dict[str, Any]:
    cfg = copy.deepcopy(TINY_MODEL_CFG)
    cfg["vision_cfg"]["image_size"] = image_size
    cfg["embed_dim"] = embed_dim
    return cfg


def build_tiny_model(cfg: dict[str, Any] | None = None, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised open_clip CLIP with the given (default tiny) config."""
    cfg = copy.deepcopy(cfg or TINY_MODEL_CFG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg)
    return model.eval()


def write_tiny_model(
    directory: str | os.PathLike[str], cfg: dict[str, Any] | None = None, seed: int = 0
) -> str:
    """Write a random tiny model to `directory`; returns its `local-dir:` spec."""
    cfg = copy.deepcopy(cfg or TINY_MODEL_CFG)
    save_local_dir(build_tiny_model(cfg, seed), cfg, directory)
    return "local-dir:" + str(Path(directory).resolve())


TINY_HF_FAMILIES = ("clip", "chinese_clip", "siglip")


def tiny_tokenizer(family: str, texts: list[str], directory: Path) -> Any:
    """A tokenizer of the family's kind, made here (no download) and saved to `directory`.

    clip: CLIP's own BPE vocabulary (open_clip ships it); chinese_clip: a BERT WordPiece
    vocabulary trained on `texts` (CJK characters are single tokens, as in Chinese-CLIP);
    siglip: a unigram vocabulary trained on `texts` that ends every text with </s>.
    """
    import tokenizers
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    if family == "clip":
        bpe = open_clip.tokenizer.SimpleTokenizer()
        # open_clip names the two special tokens <start_of_text> / <end_of_text>; transformers'
        # CLIPTokenizer, like OpenAI's files, <|startoftext|> / <|endoftext|> (ids 49406 / 49407).
        names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
        vocab = {names.get(k, k): v for k, v in bpe.encoder.items()}
        (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.__getitem__)
        (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tok = _from_files(directory, "CLIPTokenizer", 77)
    elif family == "chinese_clip":
        wordpiece = tokenizers.BertWordPieceTokenizer(lowercase=True, handle_chinese_chars=True)
        wordpiece.train_from_iterator(texts, vocab_size=2000, min_frequency=1)
        wordpiece.save_model(str(directory))
        tok = _from_files(directory, "BertTokenizer", 64)
    elif family == "siglip":
        unigram = tokenizers.Tokenizer(tokenizers.models.Unigram())
        unigram.normalizer = tokenizers.normalizers.Lowercase()
        unigram.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
        unigram.decoder = tokenizers.decoders.Metaspace()
        trainer = tokenizers.trainers.UnigramTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"],
                                                     unk_token="<unk>")
        unigram.train_from_iterator(texts, trainer)
        unigram.post_processor = tokenizers.processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", unigram.token_to_id("</s>"))])
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=unigram, pad_token="<pad>", eos_token="</s>",
                                                   unk_token="<unk>")
    else:
        raise ValueError(f"family must be one of {', '.join(TINY_HF_FAMILIES)}")
    return tok


def _from_files(directory: Path, tokenizer_class: str, max_length: int) -> Any:
    # Through from_pretrained, as a user's checkpoint loads: the constructors differ between
    # transformers releases (file names in 4, vocabularies in 5), the file layout does not.
    import transformers

    config = {"tokenizer_class": tokenizer_class, "model_max_length": max_length}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def write_tiny_hf_model(directory: str | os.PathLike[str], family: str, texts: list[str], seed: int = 0,
                        image_size: int = 32, width: int = 32, patch_size: int = 8) -> str:
    """A random tiny transformers model of `family` (clip, chinese_clip or siglip) with its
    tokenizer (see `tiny_tokenizer`) and image processor, saved with `save_pretrained` into
    `directory`; returns its `hf:` spec."""
    import tempfile

    import transformers

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as scratch:
        tok = tiny_tokenizer(family, texts, Path(scratch))
    vision = {"image_size": image_size, "patch_size": patch_size, "hidden_size": width,
              "intermediate_size": 2 * width, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {"vocab_size": len(tok), "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2,
            "num_attention_heads": 2, "pad_token_id": tok.pad_token_id}
    square = {"height": image_size, "width": image_size}
    if family == "clip":
        text |= {"max_position_embeddings": 77, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        config: Any = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=width - 8)
        model: Any = transformers.CLIPModel(config)
        processor: Any = transformers.CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=square)
    elif family == "chinese_clip":
        # No dropout and 4 heads: BERT learns the tiny synthetic task from scratch in a few epochs.
        text |= {"max_position_embeddings": 64, "num_attention_heads": 4, "hidden_dropout_prob": 0.0,
                 "attention_probs_dropout_prob": 0.0}
        config = transformers.ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=width - 8)
        model = transformers.ChineseCLIPModel(config)
        processor = transformers.ChineseCLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=square)
    elif family == "siglip":
        text |= {"max_position_embeddings": 16, "eos_token_id": tok.eos_token_id}
        config = transformers.SiglipConfig(text_config=text, vision_config=vision)
        model = transformers.SiglipModel(config)
        processor = transformers.SiglipImageProcessor(size=square)
    else:
        raise ValueError(f"family must be one of {', '.join(TINY_HF_FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = type(model)(config).eval()
    from clipsearch.core.fsutil import atomic_dir

    transformers.utils.logging.disable_progress_bar()
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return "hf:" + str(directory.resolve())


def write_index_from_vectors(
    index_dir: str | os.PathLike[str],
    *,
    model: ModelRef,
    image: tuple[np.ndarray, Sequence[Mapping[str, Any]]] | None = None,
    text: tuple[np.ndarray, Sequence[Mapping[str, Any]]] | None = None,
    factory: str = "Flat",
    search_params: dict[str, int] | None = None,
    keep: int | None = None,
) -> Path:
    """Build and publish a new version from in-memory vectors and items (tests and benchmarks).

    Items are dicts with at least ``id``; text items should carry ``text``. Returns the
    published version directory.
    """
    candidates: tuple[tuple[Modality, Any], ...] = (("image", image), ("text", text))
    pairs = {m: v for m, v in candidates if v is not None}
    if not pairs:
        raise ValueError("need image and/or text vectors")
    dims = {vecs.shape[1] for vecs, _ in pairs.values()}
    if len(dims) != 1:
        raise ValueError(f"image and text vectors have different dims {dims}")
    index_type = "flat" if factory == "Flat" else factory
    built: dict[Modality, tuple[Any, Sequence[Mapping[str, Any]], dict[str, Any]]] = {
        m: (build_faiss_index(vecs, factory), items,
            {"index_type": index_type, "factory": factory, "search_params": dict(search_params or {})})
        for m, (vecs, items) in pairs.items()
    }
    name = new_version_name()
    staged = staging_dir(index_dir)
    try:
        write_version(staged, model=model, dim=dims.pop(), indexes=built, version=name)
        return publish_version(index_dir, staged, name, keep=keep)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
