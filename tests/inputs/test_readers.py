"""Reader stage: formats, schemas and detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipsearch.inputs import readers
from clipsearch.inputs.readers import InputError, count_records, parse_schema, read_inputs
from tests.conftest import encode_image, make_image

IMG = encode_image(make_image(1))


def test_pair_tsv_and_ids(tmp_path: Path) -> None:
    p = tmp_path / "c.tsv"
    p.write_text(f"a cat\t{IMG}\n\nsecond\t{IMG}\n")
    recs = list(read_inputs([p]))
    assert [(r.id, r.text, r.source) for r in recs] == [("1", "a cat", "c.tsv:1"), ("3", "second", "c.tsv:3")]
    assert all(r.image_b64 == IMG for r in recs)
    assert count_records([p]) == 3


def test_single_column_detection(tmp_path: Path) -> None:
    texts, images = tmp_path / "t.tsv", tmp_path / "i.tsv"
    texts.write_text("hello\nworld\n")
    images.write_text(f"{IMG}\n")
    assert [r.text for r in read_inputs([texts])] == ["hello", "world"]
    (rec,) = read_inputs([images])
    assert rec.image_b64 == IMG and rec.text is None


@pytest.mark.parametrize("schema", ["id,image,text", "id:str:1,image:str:1,text:str:1"])
def test_schema(tmp_path: Path, schema: str) -> None:
    p = tmp_path / "c.tsv"
    p.write_text(f"x-1\t{IMG}\tcap\n")
    (rec,) = read_inputs([p], schema=schema)
    assert (rec.id, rec.text, rec.image_b64) == ("x-1", "cap", IMG)


@pytest.mark.parametrize("schema", ["foo,bar", "text,text", "", "id"])
def test_bad_schema(schema: str) -> None:
    with pytest.raises(InputError):
        parse_schema(schema)


def test_wrong_column_count_is_a_record_error(tmp_path: Path) -> None:
    p = tmp_path / "c.tsv"
    p.write_text(f"a\t{IMG}\nonly one column\n")
    recs = list(read_inputs([p]))
    assert recs[0].error is None and "1 columns, expected 2" in (recs[1].error or "")


def test_directory_recursive(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    make_image(1).save(tmp_path / "a" / "x.jpg")
    make_image(2).save(tmp_path / "a" / "b" / "y.PNG")
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    recs = list(read_inputs([tmp_path / "a"]))
    assert [r.id for r in recs] == ["b/y.PNG", "x.jpg"]


def test_jsonl(tmp_path: Path) -> None:
    make_image(3).save(tmp_path / "pic.jpg")
    lines = [
        {"id": "r1", "image": "pic.jpg", "text": "a pic", "metadata": {"k": 1}},
        {"id": "r2", "image": IMG},
        {"text": "text only"},
        [1, 2],
        {"id": "r5"},
    ]
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    recs = list(read_inputs([p]))
    assert recs[0].image_path == str(tmp_path / "pic.jpg") and recs[0].metadata == {"k": 1}
    assert recs[1].image_b64 == IMG
    assert recs[2].id == "3" and recs[2].text == "text only"
    assert "must be an object" in (recs[3].error or "")
    assert "neither" in (recs[4].error or "")
    assert "invalid JSON" in (recs[5].error or "")


def test_missing_input() -> None:
    with pytest.raises(InputError):
        list(read_inputs([Path("/no/such/file.tsv")]))


def test_tsv_line_endings_blank_lines_and_odd_bytes(tmp_path: Path) -> None:
    """The byte-level reader: CRLF and a last line without an ending, blank and
    whitespace-only lines skipped, padded ids and images trimmed, bad UTF-8 in a text
    replaced, and a non-ASCII byte in an image kept for base64 decoding to reject."""
    p = tmp_path / "c.tsv"
    p.write_bytes(b"id1\tcaf\xc3\xa9\t" + IMG.encode() + b"\r\n"
                  b"\r\n"
                  b" \t \n"
                  b"  id3 \tbad \xff byte\t " + IMG.encode() + b" \n"
                  b"id4\tlast\t" + IMG[:10].encode() + b"\xe9" + IMG[10:].encode())
    recs = list(read_inputs([p], schema="id,text,image"))
    assert [(r.id, r.text, r.source, r.error) for r in recs] == [
        ("id1", "café", "c.tsv:1", None),
        ("id3", "bad \ufffd byte", "c.tsv:4", None),
        ("id4", "last", "c.tsv:5", None),
    ]
    assert recs[0].image_b64 == recs[1].image_b64 == IMG
    assert recs[2].image_b64 == IMG[:10] + "\xe9" + IMG[10:]
    assert count_records([p]) == 5
    from clipsearch.core.errors import InvalidBase64
    from clipsearch.images.codec import decode_base64

    with pytest.raises(InvalidBase64, match="non-ASCII"):
        decode_base64(recs[2].image_b64, field="image", max_bytes=10**6)


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_spans_read_in_turn_equal_the_whole_inputs(tmp_path: Path, monkeypatch, chunk: int) -> None:
    """The builder's workers each read spans by seeking: every cut (span size, scan chunk
    size, blank lines, CRLF, no final newline, several inputs of all formats) gives the
    records of one plain pass, in order, each once."""
    monkeypatch.setattr(readers, "_SCAN_CHUNK", chunk)  # 5 bytes: line ends straddle every chunk edge
    tsv, jsonl, folder = tmp_path / "a.tsv", tmp_path / "b.jsonl", tmp_path / "imgs"
    tsv.write_bytes(b"".join(
        (b"\r\n" if i % 5 == 2 else b"  \n" if i % 7 == 3 else f"t{i}\t".encode() + IMG.encode() + b"\r\n"[i % 2:])
        for i in range(23)) + b"last\t" + IMG.encode())
    jsonl.write_text("".join(json.dumps({"text": f"j{i}"}) + "\n" + ("\n" if i % 3 == 0 else "") for i in range(11)))
    folder.mkdir()
    for i in range(5):
        make_image(i).save(folder / f"{i}.png")
    inputs = [tsv, jsonl, folder]
    whole = [(r.id, r.source, r.text, r.image_b64, r.image_path) for r in read_inputs(inputs)]
    assert len(whole) == 24 - 5 - 2 + 11 + 5  # 5 CRLF-only and 2 space-only lines are skipped
    lines = [24, 11 + 4, 5]
    for size in (1, 2, 3, 7, 100):
        spans = readers.plan_spans(inputs, size=size)
        assert [sum(s.count for s in spans if s.input == i) for i in range(3)] == lines
        assert all(0 < s.count <= size for s in spans)
        got = [(r.id, r.source, r.text, r.image_b64, r.image_path) for s in spans for r in readers.read_span(inputs, s)]
        assert got == whole, size
    assert count_records(inputs) == sum(lines)
    (tmp_path / "empty.tsv").write_text("")
    assert readers.plan_spans([tmp_path / "empty.tsv"]) == []


def test_a_new_plan_lists_a_changed_directory_afresh(tmp_path: Path) -> None:
    """Spans of a directory share one listing per build; the next plan (a later build in the
    same process) sees files added since."""
    for i in range(3):
        make_image(i).save(tmp_path / f"{i}.png")
    spans = readers.plan_spans([tmp_path], size=2)
    assert [r.id for s in spans for r in readers.read_span([tmp_path], s)] == ["0.png", "1.png", "2.png"]
    make_image(3).save(tmp_path / "3.png")
    spans = readers.plan_spans([tmp_path], size=2)
    assert [r.id for s in spans for r in readers.read_span([tmp_path], s)] == ["0.png", "1.png", "2.png", "3.png"]


def test_a_byte_order_mark_does_not_reach_the_first_caption(tmp_path: Path) -> None:
    from clipsearch.inputs.pairs import PairFile

    image = encode_image(make_image(1))
    path = tmp_path / "bom.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + f"a red circle\t{image}\nа blue square\t{image}\n".encode())
    records = list(read_inputs([path]))
    assert records[0].text == "a red circle" and records[0].image_b64 == image
    assert PairFile(path).row(0).text == "a red circle"
    one_column = tmp_path / "texts.tsv"
    one_column.write_bytes(b"\xef\xbb\xbfsolo caption\n")
    assert [r.text for r in read_inputs([one_column])] == ["solo caption"]


def _span_records(inputs: list[Path], confine: bool) -> list[readers.Record]:
    spans = readers.plan_spans(inputs)
    return [r for span in spans for r in readers.read_span(inputs, span, confine=confine)]


def test_confine_refuses_image_paths_outside_the_inputs_folder(tmp_path: Path) -> None:
    inside, outside = tmp_path / "corpus", tmp_path / "private"
    (inside / "img").mkdir(parents=True)
    outside.mkdir()
    make_image(1).save(inside / "img" / "ok.jpg")
    make_image(2).save(outside / "secret.jpg")
    (inside / "img" / "link.jpg").symlink_to(outside / "secret.jpg")
    paths = ["img/ok.jpg", str(outside / "secret.jpg"), "../private/secret.jpg", f"file://{outside}/secret.jpg",
             "img/link.jpg", "img/../img/ok.jpg"]
    jsonl = inside / "items.jsonl"
    jsonl.write_text("".join(json.dumps({"id": str(i), "image": p}) + "\n" for i, p in enumerate(paths)))
    trusted = _span_records([jsonl], confine=False)
    assert [r.error for r in trusted] == [None] * len(paths)  # the operator's own input: read as written
    confined = _span_records([jsonl], confine=True)
    refused = [r.id for r in confined if r.error]
    assert refused == ["1", "2", "3", "4"], [(r.id, r.error) for r in confined]
    assert all("outside the input's folder" in r.error for r in confined if r.error)
    assert all(r.image_path is None for r in confined if r.error)
