"""Every file of a version carries a checksum in its manifest, written at publish time and
checked before the version is served: a damaged file is refused and the old version kept."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from clipsearch.core.errors import IndexLoadError
from clipsearch.index import format as fmt
from clipsearch.index.format import MANIFEST_NAME, ModelRef, current_version_dir, read_manifest
from clipsearch.index.search import load_index_set
from clipsearch.service.holder import IndexHolder
from tests.tiny import write_index_from_vectors

MODEL = ModelRef(spec="local-dir:/m", fingerprint="sha256:abc")
DIM = 32


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _publish(root: Path, n: int = 200, seed: int = 0) -> Path:
    items = [{"id": f"i{i}"} for i in range(n)]
    texts = [{"id": f"t{i}", "text": f"caption {i}"} for i in range(n)]
    return write_index_from_vectors(root, model=MODEL, image=(_vectors(n, seed), items),
                                    text=(_vectors(n, seed + 1), texts))


def _flip_inside_the_vectors(path: Path, at: int | None = None) -> None:
    """Flip one byte within the stored vectors of a flat FAISS file (the header stays valid)."""
    data = bytearray(path.read_bytes())
    at = len(data) - 1000 if at is None else at
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def test_every_file_of_a_version_has_a_checksum(tmp_path) -> None:
    version = _publish(tmp_path)
    manifest = read_manifest(version)
    on_disk = {p.name for p in version.iterdir() if p.name != MANIFEST_NAME}
    assert set(manifest.files) == on_disk and len(on_disk) >= 4
    for name, want in manifest.files.items():
        assert want.size == (version / name).stat().st_size and len(want.xxh3_128) == 32


def test_a_flipped_byte_in_the_vectors_is_refused_before_serving(tmp_path) -> None:
    first = _publish(tmp_path)
    holder = IndexHolder(tmp_path)
    served = holder.load(fingerprint=MODEL.fingerprint, dim=DIM, backend="faiss-cpu", device="cpu")
    assert served is not None and served.path == first
    second = _publish(tmp_path, seed=5)
    _flip_inside_the_vectors(second / "image.faiss")
    # without the check it would load and answer "cosines" far outside [-1, 1]
    unchecked = load_index_set(second, fingerprint=MODEL.fingerprint, dim=DIM, verify="off")
    assert faiss.read_index(str(second / "image.faiss")).ntotal == 200 and unchecked.get("image") is not None
    with pytest.raises(IndexLoadError, match=r"image\.faiss: its checksum differs"):
        holder.load(fingerprint=MODEL.fingerprint, dim=DIM, backend="faiss-cpu", device="cpu")
    assert holder.current is served  # the old version keeps serving


def test_a_truncated_file_is_refused_by_its_size(tmp_path) -> None:
    version = _publish(tmp_path)
    items = version / "text.items.arrow"
    items.write_bytes(items.read_bytes()[:-10])
    with pytest.raises(IndexLoadError, match=r"text\.items\.arrow: .* bytes, the manifest says"):
        load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM)


def test_large_files_are_checked_by_sample_on_load_and_whole_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(fmt, "FULL_VERIFY_BYTES", 4096)  # every index file counts as large here
    monkeypatch.setattr(fmt, "SAMPLE_BLOCK_BYTES", 512)
    monkeypatch.setattr(fmt, "SAMPLE_BLOCKS", 4)
    version = _publish(tmp_path, n=400)
    want = read_manifest(version).files["image.faiss"]
    assert want.sampled is not None and want.size > 4 * 4096
    _flip_inside_the_vectors(version / "image.faiss", at=want.size - 100)  # inside the last sampled block
    with pytest.raises(IndexLoadError, match="checksum differs"):
        load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM)
    version = _publish(tmp_path, n=400, seed=9)
    step = max(fmt.SAMPLE_BLOCK_BYTES, want.size // fmt.SAMPLE_BLOCKS)
    _flip_inside_the_vectors(version / "image.faiss", at=step + fmt.SAMPLE_BLOCK_BYTES + 10)  # between samples
    load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM)  # auto: the sample cannot see it
    with pytest.raises(IndexLoadError, match="checksum differs"):
        load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM, verify="full")
    from clipsearch.cli import app

    r = CliRunner().invoke(app, ["index", "verify", str(tmp_path)])
    assert r.exit_code == 1 and "image.faiss: its checksum differs" in r.output


def test_index_upgrade_records_checksums_for_an_older_version(tmp_path) -> None:
    from clipsearch.cli import app

    _publish(tmp_path)
    old = current_version_dir(tmp_path)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    del manifest["files"]  # as versions written before checksums
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    r = CliRunner().invoke(app, ["index", "verify", str(tmp_path)])
    assert r.exit_code == 1 and "no checksums recorded" in r.output
    r = CliRunner().invoke(app, ["index", "upgrade", str(tmp_path)])
    assert r.exit_code == 0, r.output
    new = current_version_dir(tmp_path)
    assert new != old and set(read_manifest(new).files) == {p.name for p in new.iterdir()} - {MANIFEST_NAME}
    r = CliRunner().invoke(app, ["index", "verify", str(tmp_path)])
    assert r.exit_code == 0 and "files match their checksums" in r.output
