"""What clipsearch writes is readable by another user, as `cp` or `open` would leave it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from clipsearch.core.fsutil import atomic_dir, atomic_file, atomic_write_bytes
from clipsearch.finetune.synth import write_tsv
from clipsearch.index.format import ModelRef
from tests.tiny import write_index_from_vectors, write_tiny_model


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_atomic_writes_honour_the_umask(tmp_path, umask_022) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    with atomic_file(tmp_path / "b.txt", "w", encoding="utf-8") as f:
        f.write("y")
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("z")
    assert _modes(tmp_path)["a.bin"] == _modes(tmp_path)["b.txt"] == 0o644
    assert _modes(tmp_path)["d"] == 0o755
    os.umask(0o077)
    atomic_write_bytes(tmp_path / "private.bin", b"x")
    assert _modes(tmp_path)["private.bin"] == 0o600


def test_indexes_checkpoints_and_data_are_readable_by_others(tmp_path, umask_022) -> None:
    vectors = np.eye(4, dtype=np.float32)
    write_index_from_vectors(tmp_path / "index", model=ModelRef(spec="x", fingerprint="f"),
                             image=(vectors, [{"id": str(i)} for i in range(4)]))
    write_tiny_model(tmp_path / "model", seed=1)
    write_tsv(tmp_path / "data.tsv", 4)
    modes = {p: m for p, m in _modes(tmp_path).items() if p != "."}  # pytest makes its own tmp dirs 0700
    unreadable = {p: oct(m) for p, m in modes.items() if not (m & stat.S_IROTH)}
    assert not unreadable, unreadable
    dirs = [p for p in modes if (tmp_path / p).is_dir()]
    assert all(modes[d] & stat.S_IXOTH for d in dirs), {d: oct(modes[d]) for d in dirs}
