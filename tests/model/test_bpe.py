"""The torch-free CLIP BPE against open_clip's own SimpleTokenizer: the same ids for arbitrary
unicode (hypothesis), HTML entities, mojibake ftfy repairs, special tokens in the text, texts
past the context, and the same decoding."""

from __future__ import annotations

import numpy as np
import open_clip
from hypothesis import given, settings
from hypothesis import strategies as st

from clipsearch.model.bpe import ClipBpe

REFERENCE = open_clip.tokenizer.SimpleTokenizer(context_length=77)
MINE = ClipBpe(open_clip.tokenizer.default_bpe(), context_length=77)


def _same(texts: list[str]) -> None:
    np.testing.assert_array_equal(MINE(texts), REFERENCE(texts).numpy())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=120), min_size=1, max_size=4))
def test_arbitrary_unicode(texts: list[str]) -> None:
    _same(texts)


def test_the_hard_cases() -> None:
    _same(["", "   ", "A  Photo\tof a DOG", "caf&eacute; &amp;amp; crème brûlée", "â€œmojibakeâ€\x9d",
           "<start_of_text> hello <end_of_text>", "日本語のテキストと中文", "emoji 🐈‍⬛ and 123,456.78",
           " ".join(f"word{i}" for i in range(200)), "don't we'll they're I'd"])
    ids = MINE.encode("a photo of a red bicycle")
    assert ids == REFERENCE.encode("a photo of a red bicycle")
    assert MINE.decode(ids) == REFERENCE.decode(ids)
