"""An index's items (id, text, metadata) in an Arrow IPC file, memory-mapped when served.

The service reads only what it uses: the rows of the k results it returns, the id it is
asked to look up (a binary search over a stored sort order) and, for a filter, the columns
of the fields the filter names. Nothing grows with the item count in the service's own
memory except the masks of cached filters (one byte per item each).

Columns of `{modality}.items.arrow`:

    id           string       the item's id
    text         string       its caption (text items, and image items that had one), or null
    metadata     string       its metadata as JSON, or null when empty
    sha256       string       an image item's content hash (deduplication), or null
    extra        string       other top-level keys as JSON, or null (only when some item has them)
    id_order     int64        the rows sorted by id (stable: the first of repeated ids first)
    f<j>.k       int8         metadata field j's kind in each item (see `filters`)
    f<j>.s/n/i/b              its string / float / integer / boolean values

The schema's metadata (`clipsearch.items`) lists the fields that have columns; whether every
metadata key has them (`complete`). A field without columns is read from the JSON.

Versions written before this format kept items in `{modality}.items.jsonl`; they still load,
into memory (a warning says so), and `clipsearch index upgrade` rewrites them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from clipsearch.core.errors import IndexLoadError
from clipsearch.index.filters import KINDS, MISSING, Field, field_arrays, typed_value

log = logging.getLogger(__name__)

SCHEMA_KEY = b"clipsearch.items"
ITEMS_FORMAT = 1
BATCH_ROWS = 65_536  # rows per record batch: a lookup reads one batch's slice of a column
MAX_FIELDS = 128  # metadata keys given columns (the most frequent); the rest are read from JSON
_STANDARD = ("id", "text", "metadata", "sha256")


def _json(value: Any) -> str | None:
    return orjson.dumps(value).decode() if value else None


class _Layout:
    """What columns a set of items gets: the metadata fields with columns (the most frequent
    MAX_FIELDS) and the value kinds each holds, whether that is every field, and whether
    any item has top-level keys beyond the standard ones."""

    def __init__(self, items: Iterable[Mapping[str, Any]]) -> None:
        counts: Counter[str] = Counter()
        kinds: dict[str, set[str]] = {}
        self.extra = False
        for item in items:
            meta = item.get("metadata") or {}
            counts.update(meta.keys())
            for name, value in meta.items():
                kinds.setdefault(name, set()).update(typed_value(value)[1])
            self.extra = self.extra or any(key not in _STANDARD for key in item)
        self.names = [name for name, _ in counts.most_common(MAX_FIELDS)]
        self.kinds = {name: [k for k in KINDS if k in kinds[name]] for name in self.names}
        self.complete = len(counts) <= len(self.names)

    def schema(self, *, ordered: bool) -> pa.Schema:
        fields = [pa.field(name, pa.string()) for name in _STANDARD]
        if self.extra:
            fields.append(pa.field("extra", pa.string()))
        if ordered:
            fields.append(pa.field("id_order", pa.int64()))
        for j, name in enumerate(self.names):
            fields.append(pa.field(f"f{j}.k", pa.int8()))
            fields += [pa.field(f"f{j}.{kind}", KINDS[kind]) for kind in self.kinds[name]]
        layout = {"format": ITEMS_FORMAT, "fields": self.names, "complete": self.complete}
        return pa.schema(fields, metadata={SCHEMA_KEY: orjson.dumps(layout)})

    def batches(self, items: Iterable[Mapping[str, Any]]) -> Iterator[pa.RecordBatch]:
        """Record batches of BATCH_ROWS items, without the id order."""
        schema = self.schema(ordered=False)
        it = iter(items)
        while chunk := list(itertools.islice(it, BATCH_ROWS)):
            cols: dict[str, Any] = {
                "id": pa.array([str(x["id"]) for x in chunk], pa.string()),
                "text": pa.array([x.get("text") for x in chunk], pa.string()),
                "metadata": pa.array([_json(x.get("metadata")) for x in chunk], pa.string()),
                "sha256": pa.array([x.get("sha256") for x in chunk], pa.string()),
            }
            if self.extra:
                cols["extra"] = pa.array(
                    [_json({k: v for k, v in x.items() if k not in _STANDARD}) for x in chunk], pa.string())
            for j, name in enumerate(self.names):
                values = [(x.get("metadata") or {}).get(name, MISSING) for x in chunk]
                for kind, array in field_arrays(values, self.kinds[name]).items():
                    cols[f"f{j}.{kind}"] = array
            yield pa.RecordBatch.from_arrays([cols[f.name] for f in schema], schema=schema)


def _ordered(table: pa.Table, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """`table`'s batches with the `id_order` column of `schema` added: the rows sorted by id
    (stably, so the first of repeated ids comes first)."""
    order = pc.sort_indices(table.column("id")).cast(pa.int64())
    position, start = schema.get_field_index("id_order"), 0
    for batch in table.to_batches():
        columns = list(batch.columns)
        columns.insert(position, order.slice(start, batch.num_rows))
        start += batch.num_rows
        yield pa.RecordBatch.from_arrays(columns, schema=schema)


def items_table(items: Sequence[Mapping[str, Any]]) -> pa.Table:
    """The Arrow table of `items` (dicts with at least `id`) in memory."""
    layout = _Layout(items)
    unordered = pa.Table.from_batches(list(layout.batches(items)), schema=layout.schema(ordered=False))
    return pa.Table.from_batches(list(_ordered(unordered, layout.schema(ordered=True))),
                                 schema=layout.schema(ordered=True))


def write_items(path: Path, items: Iterable[Mapping[str, Any]]) -> None:
    """Write `items` as an Arrow IPC file (uncompressed, so it can be memory-mapped), batch by
    batch: `items` is iterated twice (a list, or anything that can restart its iteration), and
    what is held in memory at once is one batch and the id sort order (8 bytes an item)."""
    layout = _Layout(items)
    partial = path.with_name(path.name + ".unordered")
    try:
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, layout.schema(ordered=False)) as writer:
            for batch in layout.batches(items):
                writer.write_batch(batch)
        with pa.memory_map(str(partial), "r") as source:
            unordered = pa.ipc.open_file(source).read_all()
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, layout.schema(ordered=True)) as writer:
                for batch in _ordered(unordered, layout.schema(ordered=True)):
                    writer.write_batch(batch)
            del unordered
    finally:
        partial.unlink(missing_ok=True)


class ItemTable:
    """One index's items, row i describing FAISS id i; thread-safe for reading."""

    def __init__(self, table: pa.Table, source: str = "items") -> None:
        raw = (table.schema.metadata or {}).get(SCHEMA_KEY)
        try:
            layout = orjson.loads(raw) if raw is not None else None
        except orjson.JSONDecodeError:
            layout = None
        if not isinstance(layout, dict) or layout.get("format") != ITEMS_FORMAT or "id" not in table.column_names:
            raise IndexLoadError(f"{source}: not a clipsearch items table")
        self.table = table
        self._source = source
        self._fields: list[str] = list(layout.get("fields", []))
        self._complete = bool(layout.get("complete", True))
        self._batches = table.to_batches()  # zero-copy views; a row is found by its batch
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])
        self._names = {name: i for i, name in enumerate(table.column_names)}
        self._chunks: dict[str, list[pa.Array]] = {}
        self._uniform = all(b.num_rows == BATCH_ROWS for b in self._batches[:-1]) and \
            all(b.num_rows <= BATCH_ROWS for b in self._batches[-1:])  # as written: a row's batch by division
        self._parsed: dict[str, Field] = {}  # fields without columns, read from the JSON once

    @classmethod
    def from_items(cls, items: Sequence[Mapping[str, Any]]) -> ItemTable:
        return cls(items_table(items))

    def __len__(self) -> int:
        return self.table.num_rows

    def _cell(self, column: str, row: int) -> Any:
        chunks = self._chunks.get(column)
        if chunks is None:
            chunks = self._chunks[column] = [b.column(self._names[column]) for b in self._batches]
        b = row // BATCH_ROWS if self._uniform else int(np.searchsorted(self._starts, row, side="right")) - 1
        return chunks[b][row - int(self._starts[b])].as_py()

    def get(self, row: int) -> dict[str, Any]:
        """Item `row` as a dict: id, metadata (a dict), and text / sha256 / extra keys if it has them."""
        if not 0 <= row < len(self):
            raise IndexError(row)
        item: dict[str, Any] = {"id": self._cell("id", row)}
        meta = self._cell("metadata", row)
        item["metadata"] = orjson.loads(meta) if meta is not None else {}
        for name in ("text", "sha256"):
            value = self._cell(name, row)
            if value is not None:
                item[name] = value
        if "extra" in self._names and (extra := self._cell("extra", row)) is not None:
            item.update(orjson.loads(extra))
        return item

    def __getitem__(self, row: int) -> dict[str, Any]:
        return self.get(int(row))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in range(len(self)):
            yield self.get(row)

    def row_of(self, item_id: str) -> int | None:
        """The row of the item with this id (the first, if ids repeat), or None: a binary
        search over the stored sort order, reading about log2(n) ids."""
        lo, hi = 0, len(self)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._cell("id", self._cell("id_order", mid)) < item_id:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self):
            row = int(self._cell("id_order", lo))
            if self._cell("id", row) == item_id:
                return row
        return None

    def field(self, name: str) -> Field:
        """A metadata field's columns (or `id` / `text`), for filters."""
        n = len(self)
        if name in ("id", "text"):
            return Field(n, s=self.table.column(name))
        if name in self._fields:
            j = self._fields.index(name)
            cols = {kind: self.table.column(f"f{j}.{kind}") for kind in "ksnib" if f"f{j}.{kind}" in self._names}
            return Field(n, **cols)
        if self._complete:
            return Field(n, k=pa.chunked_array([pa.array(np.zeros(n, np.int8))]))
        if name not in self._parsed:  # a rare key past MAX_FIELDS: read it from every item's JSON
            values = []
            for batch in self._batches:
                for meta in batch.column(self._names["metadata"]).to_pylist():
                    values.append((orjson.loads(meta) if meta else {}).get(name, MISSING))
            self._parsed[name] = Field(n, **{k: pa.chunked_array([a]) for k, a in field_arrays(values).items()})
        return self._parsed[name]


def open_items(path: Path, expected: int) -> ItemTable:
    """A version's items: an Arrow file memory-mapped, or a JSON-lines file of an older version
    read into memory. Raises IndexLoadError when missing, corrupt or of the wrong length."""
    if path.suffix == ".jsonl":
        items = ItemTable.from_items(read_jsonl_items(path, expected))
        log.warning("%s: items in JSON lines are held in memory; `clipsearch index upgrade DIR` rewrites them "
                    "as a memory-mapped file (a new version, nothing re-encoded)", path)
        return items
    try:
        source = pa.memory_map(str(path), "r")
    except FileNotFoundError:
        raise IndexLoadError(f"{path}: items file not found") from None
    except OSError as exc:
        raise IndexLoadError(f"{path}: {exc}") from None
    try:
        table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        with contextlib.suppress(OSError):
            source.close()
        raise IndexLoadError(f"{path}: corrupt items file: {exc}") from None
    items = ItemTable(table, str(path))
    if len(items) != expected:
        raise IndexLoadError(f"{path}: {len(items)} items for {expected} vectors")
    return items


def read_jsonl_items(path: Path, expected: int) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            items = [orjson.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise IndexLoadError(f"{path}: items file not found") from None
    except orjson.JSONDecodeError as exc:
        raise IndexLoadError(f"{path}: corrupt items file: {exc}") from None
    if len(items) != expected:
        raise IndexLoadError(f"{path}: {len(items)} items for {expected} vectors")
    return items
