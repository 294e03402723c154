"""The fast tokenizer path gives exactly open_clip's token ids, on any text."""

from __future__ import annotations

import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipsearch.model.clip import FastClipTokenizer

REFERENCE = open_clip.get_tokenizer("ViT-B-32")
FAST = FastClipTokenizer.wrap(REFERENCE)

EDGE_CASES = [
    "",
    "   ",
    "a photo of a red circle on a blue background",
    "  Mixed   CASE\\twith\\ttabs\\nand\\r\\nnewlines  ",
    "fish &amp; chips &amp;amp; more &lt;b&gt;",
    "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e",
    "mojibake: caf\u00c3\u00a9",
    "\u4e00\u53ea\u6bdb\u8338\u8338\u7684\u5c0f\u72d7",  # CJK
    "emoji \U0001f431\U0001f436 and \u2764\ufe0f",
    "control\\x00chars\\x07here\\x1b[31m red\\x1c\\x1f",
    "curly \u201cquotes\u201d and \ufb01 ligature, fullwidth \uff21\uff22",
    "don't won't it's I'm they're we've I'll he'd",
    "numbers 12345 and 3.14159 and -7",
    " ".join(["word"] * 100),  # longer than the context: truncated, EOT kept last
    "x" * 500,
]


def check(texts: list[str]) -> None:
    assert FAST is not None
    expected = REFERENCE(texts)
    got = FAST(texts)
    assert got.dtype == expected.dtype == torch.long
    wrong = [t for t, a, b in zip(texts, got, expected, strict=True) if not torch.equal(a, b)]
    assert not wrong, wrong


def test_wraps_open_clip_simple_tokenizer() -> None:
    assert FAST is not None and FAST.context_length == 77


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_equal_open_clip(text: str) -> None:
    check([text.encode().decode("unicode_escape") if "\\x" in text or "\\t" in text else text])


def test_batch_equals_open_clip() -> None:
    check(EDGE_CASES)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=120), min_size=1, max_size=4))
def test_any_unicode_equals_open_clip(texts: list[str]) -> None:
    check(texts)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=200), min_size=1,
                max_size=4))
def test_any_ascii_equals_open_clip(texts: list[str]) -> None:
    check(texts)


def test_other_tokenizers_are_not_wrapped() -> None:
    assert FastClipTokenizer.wrap(open_clip.tokenizer.SimpleTokenizer(clean="canonicalize")) is None
    assert FastClipTokenizer.wrap(object()) is None
