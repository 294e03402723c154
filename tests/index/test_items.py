"""Items in a memory-mapped Arrow file: read back equal to what was written, ids found by
binary search as a dict finds them, filters on Arrow columns equal to a plain-Python
evaluation of the same JSON semantics, older JSON-lines versions still served."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import orjson
import pyarrow as pa
import pytest

from clipsearch.core.errors import IndexLoadError
from clipsearch.index import items as items_mod
from clipsearch.index.filters import InvalidFilter, compile_filter
from clipsearch.index.format import ModelRef, read_manifest
from clipsearch.index.items import ItemTable, open_items, write_items
from clipsearch.index.search import load_index_set
from tests.tiny import write_index_from_vectors

MODEL = ModelRef(spec="local-dir:/m", fingerprint="sha256:abc")
DIM = 16

VALUES = ["red", "blue", "", "1", 1, 1.0, 2.5, 0, -3, True, False, None, 2**60, 2**60 + 1, 1e300,
          [1, 2], {"a": 1}, "ü", "日本"]


def _corpus(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        meta = {key: rng.choice(VALUES) for key in ("colour", "size", "flag", "rare") if rng.random() < 0.7}
        if rng.random() < 0.3:
            meta[f"k{rng.randrange(20)}"] = rng.choice(VALUES)  # many sparse keys
        item: dict = {"id": rng.choice([f"id-{i}", f"dup-{i % 7}", f"ü-{i}"]), "metadata": meta}
        if rng.random() < 0.5:
            item["text"] = rng.choice(["a caption", "another", "日本語のキャプション"])
        if rng.random() < 0.3:
            item["sha256"] = f"{i:064x}"
        if rng.random() < 0.1:
            item["source"] = {"file": "x.tsv", "line": i}  # a key of its own: kept
        out.append(item)
    return out


def _same(v, value) -> bool:  # JSON equality: 1 == 1.0, true is not 1, "1" is not 1
    if isinstance(v, bool) or isinstance(value, bool):
        return type(v) is type(value) and v == value
    if isinstance(v, (int, float)) and isinstance(value, (int, float)):
        return v == value
    return type(v) is type(value) and v == value


_ABSENT = object()


def _value(item: dict, field: str):
    if field in ("id", "text"):
        return item.get(field, _ABSENT)
    return item["metadata"].get(field, _ABSENT)


def _reference(item: dict, spec: dict) -> bool:  # the semantics, written out plainly
    ok = True
    for key, cond in spec.items():
        if key in ("$and", "$or"):
            parts = [_reference(item, s) for s in cond]
            ok &= all(parts) if key == "$and" else any(parts)
            continue
        v = _value(item, key)
        ops = cond if isinstance(cond, dict) else {"$eq": cond}
        for op, bound in ops.items():
            here = v is not _ABSENT
            number = here and isinstance(v, (int, float)) and not isinstance(v, bool)
            if op == "$eq":
                ok &= here and _same(v, bound)
            elif op == "$ne":
                ok &= here and not _same(v, bound)
            elif op == "$in":
                ok &= here and any(_same(v, b) for b in bound)
            elif op == "$nin":
                ok &= here and not any(_same(v, b) for b in bound)
            elif op == "$exists":
                ok &= here == bound
            else:
                cmp = {"$gt": np.greater, "$gte": np.greater_equal, "$lt": np.less, "$lte": np.less_equal}[op]
                ok &= number and bool(cmp(float(v), bound))
    return ok


def _filters(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    scalars = [v for v in VALUES if not isinstance(v, (list, dict))]
    fields = ["colour", "size", "flag", "rare", "k3", "id", "text", "never"]

    def leaf() -> dict:
        field = rng.choice(fields)
        op = rng.choice(["eq", "$eq", "$ne", "$in", "$nin", "$exists", "$gt", "$gte", "$lt", "$lte"])
        if op == "eq":
            return {field: rng.choice([*scalars, "dup-3", "a caption"])}
        if op in ("$in", "$nin"):
            return {field: {op: rng.sample(scalars, rng.randint(1, 4))}}
        if op == "$exists":
            return {field: {op: rng.random() < 0.5}}
        if op in ("$eq", "$ne"):
            return {field: {op: rng.choice(scalars)}}
        return {field: {op: rng.choice([0, 1, 2.5, -3.5, 2**60])}}

    out = []
    for _ in range(n):
        shape = rng.random()
        if shape < 0.6:
            out.append(leaf())
        elif shape < 0.8:
            out.append({"$or": [leaf(), leaf()]})
        else:
            out.append({**leaf(), "$and": [leaf(), {"$or": [leaf(), leaf()]}]})
    return out


def _normal(item: dict) -> dict:
    return {**item, "id": str(item["id"]), "metadata": item.get("metadata") or {}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    items = _corpus(3000)
    path = tmp_path_factory.mktemp("items") / "image.items.arrow"
    write_items(path, items)
    return items, path


def test_items_read_back_as_written(corpus) -> None:
    items, path = corpus
    table = open_items(path, len(items))
    assert len(table) == len(items)
    assert [table[i] for i in range(len(items))] == [_normal(it) for it in items]
    assert table.table.num_rows == len(items) and table.table.column("id").num_chunks >= 1
    with pytest.raises(IndexError):
        table.get(len(items))


def test_ids_are_found_as_a_dict_finds_them(corpus) -> None:
    items, path = corpus
    table = open_items(path, len(items))
    first: dict[str, int] = {}
    for row, it in enumerate(items):
        first.setdefault(it["id"], row)
    for item_id, row in first.items():
        assert table.row_of(item_id) == row
    for missing in ("", "id-", "id-99999", "zzz", "dup-7", "\U0010ffff"):
        assert table.row_of(missing) is None
    assert ItemTable.from_items([]).row_of("x") is None


@pytest.mark.parametrize("max_fields", [items_mod.MAX_FIELDS, 2])  # 2: most keys read from the JSON
def test_filters_on_arrow_columns_equal_the_reference(corpus, tmp_path, monkeypatch, max_fields) -> None:
    items, path = corpus
    if max_fields != items_mod.MAX_FIELDS:
        monkeypatch.setattr(items_mod, "MAX_FIELDS", max_fields)
        path = tmp_path / "few.arrow"
        write_items(path, items)
    table = open_items(path, len(items))
    for spec in _filters(seed=max_fields, n=300):
        mask = compile_filter(spec).mask(table)
        want = np.array([_reference(it, spec) for it in items])
        np.testing.assert_array_equal(mask, want, err_msg=json.dumps(spec))


def test_whole_numbers_compare_exactly_past_float_precision() -> None:
    table = ItemTable.from_items([{"id": "a", "metadata": {"n": 2**60}}, {"id": "b", "metadata": {"n": 2**60 + 1}},
                                  {"id": "c", "metadata": {"n": 3.0}}, {"id": "d", "metadata": {"n": 3.5}}])
    assert compile_filter({"n": 2**60 + 1}).mask(table).tolist() == [False, True, False, False]
    assert compile_filter({"n": {"$in": [3, 3.5]}}).mask(table).tolist() == [False, False, True, True]
    for spec, field in (({"n": 10**400}, "filter.n"), ({"n": {"$gt": 10**400}}, "filter.n.$gt"),
                        ({"n": {"$in": [1, -(2**64)]}}, "filter.n.$in[1]")):
        with pytest.raises(InvalidFilter) as err:
            compile_filter(spec)
        assert err.value.field == field


def test_open_maps_the_file_and_reads_only_what_is_asked(corpus) -> None:
    items, path = corpus
    before = pa.total_allocated_bytes()
    table = open_items(path, len(items))
    table.get(1234)
    table.row_of(items[2999]["id"])
    assert pa.total_allocated_bytes() - before < 4096  # the columns stay in the mapped file


def test_bad_items_files_are_refused(corpus, tmp_path) -> None:
    items, path = corpus
    with pytest.raises(IndexLoadError, match="2999 items for 3000"):
        write_items(tmp_path / "short.arrow", items[:-1])
        open_items(tmp_path / "short.arrow", len(items))
    (tmp_path / "junk.arrow").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(IndexLoadError, match="corrupt items file"):
        open_items(tmp_path / "junk.arrow", len(items))
    with pytest.raises(IndexLoadError, match="not found"):
        open_items(tmp_path / "missing.arrow", len(items))
    other = pa.table({"id": ["a"]})
    with pa.OSFile(str(tmp_path / "other.arrow"), "wb") as sink, pa.ipc.new_file(sink, other.schema) as writer:
        writer.write_table(other)
    with pytest.raises(IndexLoadError, match="not a clipsearch items table"):
        open_items(tmp_path / "other.arrow", 1)


def test_a_version_with_json_lines_items_still_serves(tmp_path, caplog) -> None:
    """A version written before the Arrow format (items in JSON lines) loads and searches the
    same, with a warning that says how to have it memory-mapped; `index upgrade` does that."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    items = [{"id": f"i{i}", "metadata": {"colour": ["red", "blue"][i % 2], "n": i}} for i in range(200)]
    version = write_index_from_vectors(tmp_path, model=MODEL, image=(x, items))
    new = load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM).get("image")

    (version / "image.items.arrow").unlink()
    (version / "image.items.jsonl").write_bytes(b"".join(orjson.dumps(it) + b"\n" for it in items))
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["indexes"]["image"]["items"] = "image.items.jsonl"
    del manifest["files"]  # such versions had no checksums either
    (version / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(version).indexes["image"].items == "image.items.jsonl"
    with caplog.at_level(logging.WARNING):
        old = load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM).get("image")
    assert "clipsearch index upgrade" in caplog.text
    flt = compile_filter({"colour": "red", "n": {"$gte": 50}})
    np.testing.assert_array_equal(old.select(flt).mask, new.select(flt).mask)
    assert old.search(x[:3], 5) == new.search(x[:3], 5)
    assert old.row_of("i17") == new.row_of("i17") == 17

    # `clipsearch index upgrade` publishes it again with Arrow items, linking the index file
    from typer.testing import CliRunner

    from clipsearch.cli import app
    from clipsearch.index.format import current_version_dir

    r = CliRunner().invoke(app, ["index", "upgrade", str(tmp_path)])
    assert r.exit_code == 0, r.output
    upgraded = current_version_dir(tmp_path)
    assert upgraded != version and read_manifest(upgraded).indexes["image"].items == "image.items.arrow"
    assert (upgraded / "image.faiss").stat().st_ino == (version / "image.faiss").stat().st_ino  # linked, not copied
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = load_index_set(upgraded, fingerprint=MODEL.fingerprint, dim=DIM).get("image")
    assert "rebuild" not in caplog.text and "upgrade" not in caplog.text
    np.testing.assert_array_equal(again.select(flt).mask, new.select(flt).mask)
    assert again.search(x[:3], 5) == new.search(x[:3], 5) and again.row_of("i17") == 17
    assert (version / "image.items.jsonl").is_file()  # the old version is left as it was
    r = CliRunner().invoke(app, ["index", "upgrade", str(tmp_path)])
    assert r.exit_code == 0 and "up to date" in r.output
    r = CliRunner().invoke(app, ["index", "upgrade", str(upgraded)])
    assert r.exit_code == 1 and "single version directory" in r.output
