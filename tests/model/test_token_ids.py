"""Token ids read back as text (the OpenAI route's token-array input): ids of the model's own
tokenizer, whole or longer than the context, give the same tokens as the text they came from,
for open_clip's BPE and the transformers families' tokenizers; other ids give None."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.model.clip import load_model
from tests.conftest import HF_FAMILIES

LONG = " ".join(f"shape{i} colour{i % 7}" for i in range(200))


def test_open_clip_ids_whole_and_cut(tiny_model) -> None:
    tok = tiny_model.tokenizer
    for text in ("a red circle on a grey field", LONG):
        ids = tok.encode(text)
        read = tiny_model.text_of_ids(ids)
        assert read is not None
        np.testing.assert_array_equal(tiny_model.tokenize([read]), tiny_model.tokenize([text]))
        padded = tiny_model.tokenize([text])[0].tolist()  # with start, end and padding tokens
        assert tiny_model.tokenize([tiny_model.text_of_ids(padded)]).tolist() == [padded]
    rng = np.random.default_rng(0)
    assert tiny_model.text_of_ids([100_000, 12, 7]) is None  # past the vocabulary: tiktoken's, say
    foreign = rng.integers(0, 256, 40).tolist()  # byte tokens with no word ends: not what this BPE makes
    assert tiny_model.text_of_ids(foreign) is None


def test_context_text_keeps_what_the_tokenizer_reads(tiny_model) -> None:
    cut = tiny_model.context_text(LONG * 20)
    assert len(cut) < 3000
    np.testing.assert_array_equal(tiny_model.tokenize([cut]), tiny_model.tokenize([LONG * 20]))


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_transformers_tokenizers(family, hf_spec, hf_texts) -> None:
    model = load_model(hf_spec(family), device="cpu")
    inner = model.tokenizer.tokenizer
    for text in (hf_texts[3], hf_texts[200], " ".join(hf_texts[:40])):
        ids = inner(text)["input_ids"]
        read = model.text_of_ids(ids)
        assert read is not None, (family, text)
        np.testing.assert_array_equal(model.tokenize([read]), model.tokenize([text]))
    assert model.text_of_ids([len(inner) + 5]) is None
