"""Parquet and WebDataset inputs: records, spans, bad rows, and the vectors they index."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.builder.build import BuildOptions, run_build
from clipsearch.index.search import load_index_set
from clipsearch.inputs.readers import plan_spans, read_inputs, read_span
from tests.conftest import image_bytes, make_image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _parquet(path: Path) -> list[tuple[str, str, bytes | None]]:
    rows = [(f"k{i:03d}", f"caption {i}", image_bytes(make_image(300 + i))) for i in range(30)]
    rows[5] = ("k005", None, None)  # nothing to index
    rows[9] = ("k009", "caption 9", b"\xff\xd8\xff broken")  # the encoder rejects it
    table = pa.table({"key": [r[0] for r in rows], "caption": [r[1] for r in rows], "jpg": [r[2] for r in rows],
                      "url": [f"https://example.com/{i}.jpg" for i in range(30)], "width": list(range(30)),
                      "metadata": [json.dumps({"n": i}) for i in range(30)]})
    pq.write_table(table, path, row_group_size=7)
    return rows


def _webdataset(path: Path) -> list[tuple[str, str, bytes]]:
    samples = [(f"s{i:03d}", f"tar caption {i}", image_bytes(make_image(700 + i), "PNG")) for i in range(12)]
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for key, caption, png in samples:
            add(f"{key}.png", png)
            add(f"{key}.txt", caption.encode())
            add(f"{key}.json", json.dumps({"key": key}).encode())
        add("s999.json", b"{not json")
    return samples


def test_records_and_spans(tmp_path: Path) -> None:
    rows = _parquet(tmp_path / "a.parquet")
    samples = _webdataset(tmp_path / "b.tar")
    inputs = [tmp_path / "a.parquet", tmp_path / "b.tar"]
    whole = list(read_inputs(inputs))
    for size in (1, 4, 7, 100):  # any span size reads the same records, in the same order
        spans = plan_spans(inputs, size=size)
        assert [r.id for s in spans for r in read_span(inputs, s)] == [r.id for r in whole]
    assert [r.id for r in whole] == [r[0] for r in rows] + [s[0] for s in samples] + ["s999"]
    first = whole[0]
    assert first.text == "caption 0" and first.image_bytes == rows[0][2]
    assert first.metadata == {"n": 0, "url": "https://example.com/0.jpg", "width": 0}
    assert whole[5].error == "row has neither a text nor an image column with a value"
    tar0 = whole[30]
    assert tar0.text == "tar caption 0" and tar0.image_bytes == samples[0][2] and tar0.metadata == {"key": "s000"}
    assert whole[-1].error == "s999.json is not valid JSON"


def test_parquet_and_webdataset_index_the_models_vectors(tmp_path: Path, tiny_spec, tiny_model) -> None:
    rows = _parquet(tmp_path / "a.parquet")
    samples = _webdataset(tmp_path / "b.tar")
    summary = run_build(BuildOptions(inputs=[tmp_path / "a.parquet", tmp_path / "b.tar"], output=tmp_path / "idx",
                                     model=tiny_spec, device="cpu", shard_size=8, progress=False, workers=0),
                        model=tiny_model)
    assert sorted(e["source"] for e in summary.errors) == ["a.parquet:row 10", "a.parquet:row 6", "b.tar:s999"]
    served = load_index_set(summary.version_dir, fingerprint=tiny_model.info.fingerprint, dim=tiny_model.dim)
    image = served.get("image")
    good = [r for r in rows if r[2] is not None and r[0] != "k009"]
    assert [it["id"] for it in image.items] == [r[0] for r in good] + [s[0] for s in samples]
    want = tiny_model.encode_images([Image.open(io.BytesIO(r[2])) for r in good] +
                                    [Image.open(io.BytesIO(s[2])) for s in samples])
    assert (image.vectors_of(np.arange(image.count)) * want).sum(1).min() >= 0.9999
    assert image.items[0]["metadata"]["url"] == "https://example.com/0.jpg"
    text = served.get("text")
    captions = [r[1] for r in rows if r[1] is not None] + [s[1] for s in samples]
    assert [it["text"] for it in text.items] == captions
    assert (text.vectors_of(np.arange(text.count)) * tiny_model.encode_texts(captions)).sum(1).min() >= 0.9999
