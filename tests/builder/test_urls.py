"""Inputs given as fsspec URLs: a corpus in fsspec's in-memory filesystem, which has no local
path at all, builds the same index as the same files on disk (TSV, JSONL with relative
image paths, an image directory, Parquet, WebDataset)."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest

from clipsearch.builder.build import BuildOptions, run_build
from clipsearch.index.format import read_manifest
from clipsearch.index.search import load_index_set
from clipsearch.inputs.readers import InputError, describe_inputs, input_path
from tests.builder.test_formats import _parquet, _webdataset
from tests.conftest import encode_image, make_image, make_photo_folder


def _corpus(root: Path) -> list[str]:
    lines = [f"caption {i}\t{'not base64 @@' if i == 7 else encode_image(make_image(50 + i))}" for i in range(40)]
    (root / "corpus.tsv").write_text("\n".join(lines) + "\n")
    make_photo_folder(root, 6, seed=80)
    records = [{"id": f"j{i}", "image": f"photos/sub/p{i:02d}.jpg", "text": f"json {i}", "metadata": {"n": i}}
               for i in range(6)]
    records.append({"id": "j-missing", "image": "photos/none.jpg"})
    records.append({"id": "j-protocol", "image": "nosuchfs://bucket/x.jpg"})
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _parquet(root / "rows.parquet")
    _webdataset(root / "samples.tar")
    return ["corpus.tsv", "records.jsonl", "photos", "rows.parquet", "samples.tar"]


def _upload(root: Path, url: str) -> None:
    fs = fsspec.filesystem("memory")
    for p in sorted(root.rglob("*")):
        if p.is_file():
            fs.pipe(f"{url}/{p.relative_to(root).as_posix()}", p.read_bytes())


def _served(version_dir: Path, model) -> dict:
    served = load_index_set(version_dir, fingerprint=model.info.fingerprint, dim=model.dim)
    out = {}
    for modality in ("image", "text"):
        index = served.get(modality)
        out[modality] = ([it["id"] for it in index.items], [it["metadata"] for it in index.items],
                         index.vectors_of(np.arange(index.count)))
    return out


def test_a_corpus_behind_urls_builds_the_same_index(tmp_path: Path, tiny_spec, tiny_model) -> None:
    local_root = tmp_path / "corpus"
    local_root.mkdir()
    names = _corpus(local_root)
    _upload(local_root, "memory://bucket/corpus")
    opts = {"model": tiny_spec, "device": "cpu", "shard_size": 16, "progress": False, "workers": 0}

    local = run_build(BuildOptions(inputs=[local_root / n for n in names], output=tmp_path / "local", **opts),
                      model=tiny_model)
    urls = [input_path(f"memory://bucket/corpus/{n}") for n in names]
    remote = run_build(BuildOptions(inputs=urls, output=tmp_path / "remote", **opts), model=tiny_model)

    want, got = _served(local.version_dir, tiny_model), _served(remote.version_dir, tiny_model)
    for modality in ("image", "text"):
        assert got[modality][0] == want[modality][0]  # ids
        assert got[modality][1] == want[modality][1]  # metadata
        np.testing.assert_allclose(got[modality][2], want[modality][2], atol=1e-6)
    assert len(want["image"][0]) == 39 + 6 + 6 + 28 + 12  # every good image of the five inputs

    def reasons(summary, prefix: str) -> list[tuple[str, str]]:
        return sorted((e["source"].replace(prefix, ""), e["reason"].split(" (")[0]) for e in summary.errors)

    assert reasons(remote, "memory://bucket/corpus/") == reasons(local, str(local_root) + "/")
    assert ("records.jsonl:8", "cannot read image file") in reasons(remote, "")  # an unknown protocol: one bad record
    inputs = read_manifest(remote.version_dir).build["inputs"]
    assert [d["path"] for d in inputs] == [f"memory://bucket/corpus/{n}" for n in names]
    assert {d["kind"] for d in inputs} == {"url", "dir"} and all(d["stamp"] for d in inputs)


def test_a_changed_url_input_changes_its_stamp_and_a_missing_one_is_refused(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("memory://bucket/stamps/a.tsv", b"one\n")
    first = describe_inputs([input_path("memory://bucket/stamps/a.tsv")])
    assert describe_inputs([input_path("memory://bucket/stamps/a.tsv")]) == first
    fs.pipe("memory://bucket/stamps/a.tsv", b"two, longer\n")
    assert describe_inputs([input_path("memory://bucket/stamps/a.tsv")]) != first
    with pytest.raises(InputError, match="does not exist"):
        describe_inputs([input_path("memory://bucket/stamps/missing.tsv")])
    assert isinstance(input_path("relative/dir"), Path) and isinstance(input_path("C:/x"), Path)
