from __future__ import annotations

from clipsearch.finetune.synth import synth_rows, write_tsv


def test_deterministic_and_captions_match_scenes(tmp_path) -> None:
    a = write_tsv(tmp_path / "a.tsv", 20, seed=5).read_bytes()
    b = write_tsv(tmp_path / "b.tsv", 20, seed=5).read_bytes()
    assert a == b and a != write_tsv(tmp_path / "c.tsv", 20, seed=6).read_bytes()
    for caption, image, scene in synth_rows(30, seed=1):
        assert scene.colour in caption and scene.shape in caption  # size/position/background are optional
        assert "\t" not in caption and image
    zh = synth_rows(5, seed=1, lang="zh")
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in c) for c, _, _ in zh)
