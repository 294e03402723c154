"""The CLIP BPE tokenizer without torch: open_clip's `SimpleTokenizer` with its default `clean="lower"`
(open_clip/tokenizer.py: the byte-to-unicode table, the merges of `bpe_simple_vocab_16e6.txt.gz`,
the same word pattern, ftfy and HTML unescaping), giving the same ids as open_clip as a numpy
array (tests/model/test_bpe.py compares them on arbitrary unicode). Exports use it, so an
export's tokenizer needs only `ftfy`, `regex` and numpy.
"""

from __future__ import annotations

import gzip
import html
import itertools
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

SPECIAL = ("<start_of_text>", "<end_of_text>")
_MERGES = 49152 - 256 - 2  # open_clip reads this many merge lines
_PLAIN = regex.compile(r"[ -%'-~]*")  # printable ASCII but '&': ftfy and unescaping leave it as it is


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Each byte's stand-in character: printable ones as themselves, the rest moved past 255."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clean(text: str, lower: bool = True) -> str:
    """open_clip's `_clean_lower` (or with `lower=False` its `_clean_whitespace`): ftfy, HTML
    unescaped twice, whitespace collapsed, lower case."""
    if not _PLAIN.fullmatch(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    text = " ".join(text.split())
    return text.lower() if lower else text


class ClipBpe:
    """Texts -> ids (n, context_length), start and end tokens included, zero padded; a text
    past the context is cut and ends with the end token, as open_clip's."""

    MAX_CACHED_WORDS = 200_000

    def __init__(self, bpe_path: str | Path, context_length: int = 77) -> None:
        with gzip.open(bpe_path) as f:
            lines = f.read().decode("utf-8").split("\n")[1 : _MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + list(SPECIAL)
        self.encoder = {piece: i for i, piece in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot_token_id, self.eot_token_id = self.encoder[SPECIAL[0]], self.encoder[SPECIAL[1]]
        self.context_length = context_length
        words = r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
        self.pattern = regex.compile("|".join(SPECIAL) + words, regex.IGNORECASE)
        self._words: dict[str, tuple[int, ...]] = {}

    def _bpe(self, token: str) -> list[str]:
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(itertools.pairwise(word))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._words.get(word)
        if ids is None:
            if word in SPECIAL:
                ids = (self.encoder[word],)
            else:
                mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                ids = tuple(self.encoder[piece] for piece in self._bpe(mapped))
            if len(self._words) >= self.MAX_CACHED_WORDS:
                self._words.clear()
            self._words[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        return [i for word in self.pattern.findall(clean(text)) for i in self._word_ids(word)]

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return pack([self.encode(t) for t in texts], self.context_length, self.sot_token_id, self.eot_token_id)


def pack(encoded: Sequence[Sequence[int]], context_length: int, sot: int, eot: int) -> np.ndarray:
    """Each text's ids between the start and end tokens, zero padded to `context_length`; a text
    past it is cut and ends with the end token, as open_clip's."""
    out = np.zeros((len(encoded), context_length), np.int64)
    for row, body in enumerate(encoded):
        ids = [sot, *body, eot]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot
        out[row, : len(ids)] = ids
    return out
