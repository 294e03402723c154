"""What the rest of clipsearch sees of a loaded model, without torch: `Model` (the interface
the service, the builder and evaluation use), `ModelInfo`, and the text-side logic that a
torch model (`clip.ClipModel`) and an export (`exported.ExportedModel`) share.

Arrays in and out are numpy for an export and torch tensors (CPU or GPU) for a torch model;
the callers pass back what the model gave them (tokens to `encode_tokens`, pixels from its
`preprocess` to `encode_pixels`), so neither needs to know which.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

CHARS_PER_TOKEN = 32  # see TextSide.context_text
PAD = -1  # a transformers tokenizer's id where its attention mask is 0 (hf.py, portable.py)
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class ModelInfo:
    spec: str
    pretrained: str | None
    fingerprint: str
    dim: int
    context_length: int
    image_size: tuple[int, int]
    device: str
    dtype: str
    family: str = "open_clip"  # or a transformers model_type: clip, chinese_clip, siglip
    runtime: str = "torch"  # or onnx, openvino: an export (clipsearch.model.exported)


class Model(Protocol):
    """A loaded CLIP model as the service, the builder and evaluation use it."""

    info: ModelInfo
    dim: int
    context_length: int
    image_size: tuple[int, int]
    device: Any  # torch.device, or exported.CPU: has .type
    tokenizer: Any
    preprocess_transform: Any

    def tokenize(self, texts: Sequence[str]) -> Any: ...
    def count_tokens(self, texts: Sequence[str]) -> int: ...
    def context_text(self, text: str) -> str: ...
    def text_of_ids(self, ids: Sequence[int]) -> str | None: ...
    def preprocess(self, image: Any) -> Any: ...
    def encode_tokens(self, tokens: Any) -> np.ndarray: ...
    def text_vectors(self, tokens: Any) -> Any: ...
    def encode_pixels(self, pixels: Any) -> np.ndarray: ...
    def image_vectors(self, pixels: Any) -> Any: ...
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray: ...
    def encode_images(self, images: Sequence[Any], batch_size: int = 128) -> np.ndarray: ...
    def warm_up(self, batch_sizes: Sequence[int]) -> None: ...
    def set_threads(self, threads: int) -> None: ...
    def capture_graphs(self, max_batch: int) -> list[str]: ...
    @property
    def graphed_towers(self) -> list[str]: ...
    @property
    def logit_scale(self) -> float: ...
    @property
    def logit_bias(self) -> float | None: ...


def is_bpe(tokenizer: Any) -> bool:
    """open_clip's `SimpleTokenizer` or its torch-free twin `bpe.ClipBpe`: the CLIP BPE."""
    return all(hasattr(tokenizer, name) for name in ("sot_token_id", "eot_token_id", "encoder", "decode", "encode"))


class TextSide:
    """Text handling that depends on the tokenizer only: what `context_text`, `text_of_ids`
    and `count_tokens` need is `tokenizer`, `context_length`, `pad_id` and `tokenize`."""

    tokenizer: Any
    context_length: int
    pad_id: int

    def tokenize(self, texts: Sequence[str]) -> Any:
        raise NotImplementedError

    def count_tokens(self, texts: Sequence[str]) -> int:
        """How many tokens the texts take (start and end tokens included, padding not)."""
        return int((np.asarray(self.tokenize(texts)) != self.pad_id).sum())

    def context_text(self, text: str) -> str:
        """`text` cut to the part the tokenizer can use, so that a long text costs what it
        yields: its first `context_length` x 32 non-space characters, in whole words but the
        last. The tokenizer keeps `context_length` tokens anyway; a token is one character or
        more, so the vector is the whole text's unless its tokens average more than 32."""
        budget = self.context_length * CHARS_PER_TOKEN
        if len(text) <= budget:
            return text
        words: list[str] = []
        left = budget
        for match in _WORD.finditer(text):
            word = match.group()
            words.append(word[:left])
            left -= len(word)
            if left <= 0:
                break
        return " ".join(words)

    def text_of_ids(self, ids: Sequence[int]) -> str | None:
        """The text that token `ids` stand for, if they are this model's tokenizer's ids: decoded
        and tokenized again they come back the same (start, end and padding tokens aside). Else
        None: another tokenizer's ids (tiktoken's, say) are not this model's text.

        Only the first `context_length` ids are read (the model reads no further), so a long
        array costs what it yields; of a cut array, all but the last id read must come back
        (the cut may split a word)."""
        tok = self.tokenizer
        if is_bpe(tok):
            body = list(ids[: self.context_length + 2])
            if body and body[0] == tok.sot_token_id:
                body = body[1:]
            if tok.eot_token_id in body:  # what follows the end token may only be padding
                end = body.index(tok.eot_token_id)
                if any(body[end + 1 :]) or any(ids[self.context_length + 2 :]):
                    return None
                body = body[:end]
            vocab, decode = len(tok.encoder), tok.decode
            encode: Any = tok.encode
        else:
            inner = getattr(tok, "tokenizer", None)
            if inner is None or not hasattr(inner, "all_special_ids"):
                return None
            special = set(inner.all_special_ids)
            body = [i for i in ids[: self.context_length + 2] if i not in special]
            vocab, decode = len(inner), inner.decode

            def encode(text: str) -> list[int]:
                return list(inner(text, add_special_tokens=False)["input_ids"])

        cut = len(ids) > self.context_length + 2
        body = body[: self.context_length]
        if not body or any(not 0 <= i < vocab for i in body):
            return None
        text = str(decode(body)).strip()
        again = list(encode(text))
        same = again[: len(body) - 1] == body[:-1] if cut else again == body
        return text if same else None


def to_host(array: Any) -> np.ndarray:
    """A model's output as a numpy array on the host: as it is from an export; from torch (a
    GPU, maybe) through `cuda_wait.to_numpy`."""
    if isinstance(array, np.ndarray):
        return array
    from clipsearch.model.cuda_wait import to_numpy

    return to_numpy(array)
