"""Words that count: BM25 over the items' texts, in SQLite's FTS5 (Python's own sqlite3).

The builder writes one FTS5 table per index (`<modality>.lexical.sqlite` in the version, its
rowid the item's row), and the service opens it read-only and immutable: SQLite reads the
pages a query touches through the OS page cache, nothing is held in Python. Texts and queries
go through the same `terms`: FTS5's unicode61 tokenizer (case and diacritics folded) splits
words; runs of CJK characters, which have no spaces between words, become overlapping
character bigrams (and a lone character stays one), the usual way to index Chinese and
Japanese without a dictionary. A query matches an item that holds any of its terms, ranked
by FTS5's bm25() (k1 1.2, b 0.75).
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+")
_TERM = re.compile(r"\w+")
TABLE = "items"


def terms(text: str) -> str:
    """`text` as the space-separated terms that are indexed and searched."""

    def bigrams(match: re.Match[str]) -> str:
        run = match.group()
        return " " + (run if len(run) == 1 else " ".join(run[i : i + 2] for i in range(len(run) - 1))) + " "

    return _CJK.sub(bigrams, text)


def match_query(text: str) -> str | None:
    """An FTS5 MATCH expression for a free-text query: any of its terms, each quoted (so that
    words like AND, NEAR or a stray quote are words); None when it has no terms."""
    words = dict.fromkeys(w.lower() for w in _TERM.findall(terms(text)))
    return " OR ".join(f'"{w}"' for w in words) or None


def write_lexical(path: Path, texts: Iterable[str | None]) -> int:
    """Write the FTS5 table of `texts` (row i: texts[i]; None or empty: not indexed) to `path`;
    returns how many texts were indexed."""
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    try:
        con.execute(f"CREATE VIRTUAL TABLE {TABLE} USING fts5(body, tokenize='unicode61 remove_diacritics 2')")
        rows = ((i, terms(t)) for i, t in enumerate(texts) if t and t.strip())
        con.executemany(f"INSERT INTO {TABLE}(rowid, body) VALUES (?, ?)", rows)
        count = con.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
        con.execute(f"INSERT INTO {TABLE}({TABLE}) VALUES ('optimize')")  # one b-tree per term: fewer reads
        con.commit()
    finally:
        con.close()
    return int(count)


class LexicalIndex:
    """A version's FTS5 table, read-only; one connection per thread that searches."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._connect().execute(f"SELECT count(*) FROM {TABLE}").fetchone()  # fail at load, not at a query

    def _connect(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
            self._local.con = con
        return con

    def search(self, query: str, k: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the k best matches, best first (score: -bm25, higher is better);
        with `mask`, only rows it selects."""
        expr = match_query(query)
        if expr is None or k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        cursor = self._connect().execute(
            f"SELECT rowid, bm25({TABLE}) FROM {TABLE} WHERE {TABLE} MATCH ? ORDER BY rank, rowid", (expr,))
        rows: list[int] = []
        scores: list[float] = []
        for row, score in cursor:
            if mask is not None and not mask[row]:
                continue
            rows.append(row)
            scores.append(-score)
            if len(rows) == k:
                break
        cursor.close()
        return np.asarray(rows, np.int64), np.asarray(scores, np.float32)
